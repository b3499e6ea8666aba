"""How one command travels into the rig: a POSIX sh script on the control share.

The host writes ``command.sh`` (cd, a clean environment, exec argv) with every
word single-quoted (shlex.quote, POSIX shell quoting), so any argv, path or
value survives unchanged; the rig's init runs it inside the chroot.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

# XDG_CACHE_HOME: the rig must find the guest images where the host built them.
PASSED_ENV = ("PATH", "HOME", "XDG_CACHE_HOME", "TERM", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TZ",
              "USER", "LOGNAME")
PASSED_PREFIXES = ("EMBER_",)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RIG_ENV = {"EMBER_IN_RIG": "1", "PYTHONUNBUFFERED": "1"}
EXIT_NO_CWD = 126
ENV_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _valid_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and set(name) <= ENV_NAME_CHARS


def rig_environment(host_env: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the command sees: a safe subset of ``host_env`` plus ``extra``."""
    env = {k: v for k, v in host_env.items() if k in PASSED_ENV or k.startswith(PASSED_PREFIXES)}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(extra or {})
    env.update(RIG_ENV)
    bad = [k for k in env if not _valid_name(k) or "\0" in env[k]]
    if bad:
        raise ValueError(f"environment names or values the rig cannot pass: {bad}")
    return env


def command_script(argv: list[str], cwd: str, env: Mapping[str, str], background: list[str] | None = None) -> str:
    """The sh script that runs ``argv`` in ``cwd`` with ``env`` (init starts it with env -i),
    after starting ``background`` (a command left running beside it, output discarded)."""
    if not argv:
        raise ValueError("the rig needs a command to run")
    if any("\0" in word for word in [*argv, *(background or [])]) or "\0" in cwd:
        raise ValueError("command words and the working directory cannot contain NUL")
    exports = "".join(f"export {shlex.quote(f'{k}={v}')}\n" for k, v in sorted(env.items()))
    side = f"{shlex.join(background)} </dev/null >/dev/null 2>&1 &\n" if background else ""
    return f"cd {shlex.quote(cwd)} || exit {EXIT_NO_CWD}\n{exports}{side}exec {shlex.join(argv)}\n"


def init_settings(out_dir: str | None) -> str:
    """Shell assignments the rig's init sources before it runs the command."""
    return f"EMBER_RIG_OUT={shlex.quote(out_dir or '')}\n"


def snapshot_table(trees: list[str]) -> str:
    """Lines 'treeN PATH' telling init where to mount disk serial treeN (paths may hold spaces)."""
    if any("\n" in tree for tree in trees):
        raise ValueError("snapshot paths cannot contain newlines")
    return "".join(f"tree{index} {tree}\n" for index, tree in enumerate(trees))
