"""Builds Ember's default guest kernel from Debian's linux-source package.

Follows the kernel's own recipe (Documentation/kbuild/kconfig.rst): ``make
tinyconfig``, merge the microvm.config fragment with
scripts/kconfig/merge_config.sh, ``make olddefconfig``, then build vmlinux
(ELF, for Ember's ELF loader) and bzImage (Linux x86 boot protocol).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from ember.errors import EmberError
from ember.images import cache
from ember.images.progress import BuildProgress
from ember.images.tools import KERNEL_TOOLS, require_tools

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT_NAME = "microvm.config"
RECIPE_VERSION = b"ember-kernel-recipe-1 tinyconfig+merge+olddefconfig vmlinux bzImage"
KERNEL_KIND = "kernel"
ARTIFACTS = {"vmlinux": "vmlinux", "kernel": "bzImage", "config": "config"}
BUILD_OUTPUTS = {"vmlinux": "vmlinux", "bzImage": "arch/x86/boot/bzImage", "config": ".config"}
MAKE_TARGETS = ("vmlinux", "bzImage")
LOG_TAIL_LINES = 40
COMPILE_LINE = re.compile(rb"^\s+(CC|AS)\s")
BUILD_ENV = {
    "LC_ALL": "C",
    "KBUILD_BUILD_USER": "ember",
    "KBUILD_BUILD_HOST": "ember",
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01",
}
OPTION_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
OPTION_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
UNSET = "n"


def fragment_text() -> str:
    """The config fragment shipped in the package (ember/images/microvm.config)."""
    return resources.files("ember.images").joinpath(FRAGMENT_NAME).read_text()


def parse_config(text: str) -> dict[str, str]:
    """Kconfig text -> {option: value}; '# CONFIG_X is not set' reads as 'n'."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        match = OPTION_SET.match(line) or OPTION_UNSET.match(line)
        if match:
            options[match.group(1)] = match.group(2) if match.re is OPTION_SET else UNSET
    return options


def config_mismatches(required: dict[str, str], actual: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Options whose built value differs from the fragment: {opt: (want, got)}."""
    return {opt: (want, actual.get(opt, UNSET)) for opt, want in required.items()
            if actual.get(opt, UNSET) != want}


def source_version(tarball: Path = SOURCE_TARBALL) -> str:
    """The linux-source package version, else the tarball's name, size and mtime."""
    if not tarball.is_file():
        raise EmberError(f"kernel source {tarball} is missing: install it with 'apt-get install {SOURCE_PACKAGE}'")
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", SOURCE_PACKAGE],
                             capture_output=True, text=True, check=True)
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    st = tarball.stat()
    return f"{tarball.name.removesuffix('.tar.xz')}-{cache.short_hash(b'%d:%d' % (st.st_size, st.st_mtime_ns))}"


def kernel_key(tarball: Path = SOURCE_TARBALL) -> str:
    """Cache key: source version + hash of the fragment and the build recipe."""
    return f"{source_version(tarball)}-{cache.short_hash(fragment_text().encode(), RECIPE_VERSION)}"


def kernel_dir(tarball: Path = SOURCE_TARBALL) -> Path:
    return cache.cache_dir() / KERNEL_KIND / kernel_key(tarball)


def cached_kernel(tarball: Path = SOURCE_TARBALL) -> dict[str, Path] | None:
    """The artifacts of an earlier build with the same key, or None."""
    final = kernel_dir(tarball)
    paths = {name: final / file for name, file in ARTIFACTS.items()}
    return paths if all(p.is_file() for p in paths.values()) else None


def _run(cmd: list[str], cwd: Path, logfile: Path, progress: BuildProgress | None = None) -> None:
    """Run one build command, appending its output to ``logfile``."""
    env = {**os.environ, **BUILD_ENV}
    tail: collections.deque[bytes] = collections.deque(maxlen=LOG_TAIL_LINES)
    with open(logfile, "ab") as logf:
        logf.write(b"$ " + " ".join(cmd).encode() + b"\n")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            tail.append(line)
            if progress is not None and COMPILE_LINE.match(line):
                progress.advance()
        status = proc.wait()
    if status != 0:
        last = b"".join(tail).decode(errors="replace")
        raise EmberError(f"kernel build step '{' '.join(cmd[:3])}' failed (exit {status}); "
                         f"full log: {logfile}\n{last}")


def _configure(src: Path, fragment: Path, logfile: Path, progress: BuildProgress) -> None:
    progress.step("configuring (tinyconfig + microvm.config)")
    _run(["make", "tinyconfig"], src, logfile)
    _run(["bash", "scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)], src, logfile)
    _run(["make", "olddefconfig"], src, logfile)
    missing = config_mismatches(parse_config(fragment.read_text()), parse_config((src / ".config").read_text()))
    if missing:
        detail = ", ".join(f"{o}={want} (got {got})" for o, (want, got) in sorted(missing.items()))
        raise EmberError(f"kernel config dropped options of {FRAGMENT_NAME}: {detail}")


def _build_into(out: Path, tarball: Path, logfile: Path, progress: BuildProgress) -> None:
    """Extract, configure and compile in ``out``'s parent; copy results to ``out``."""
    scratch = out.parent
    src = scratch / "src"
    src.mkdir()
    progress.step(f"extracting {tarball.name}")
    _run(["tar", "-xf", str(tarball), "-C", str(src), "--strip-components=1"], scratch, logfile)
    fragment = scratch / FRAGMENT_NAME
    fragment.write_text(fragment_text())
    _configure(src, fragment, logfile, progress)
    progress.step("compiling")
    _run(["make", f"-j{os.cpu_count() or 1}", *MAKE_TARGETS], src, logfile, progress)
    for name, rel in BUILD_OUTPUTS.items():
        shutil.copy2(src / rel, out / name)


def build_kernel(progress: bool = True, tarball: Path = SOURCE_TARBALL) -> dict[str, Path]:
    """Build (or reuse from the cache) the guest kernel.

    Returns {'kernel': bzImage, 'vmlinux': vmlinux, 'config': .config}.
    """
    found = cached_kernel(tarball)
    if found:
        return found
    final = kernel_dir(tarball)
    cache.refuse_build_in_rig(final)
    require_tools(KERNEL_TOOLS)
    with cache.locked(final.parent):
        found = cached_kernel(tarball)
        if found:
            return found
        cache.remove_stale_builds(final.parent)
        logfile = final.parent / f"{final.name}.build.log"  # outside staging: survives a failure
        logfile.unlink(missing_ok=True)
        with BuildProgress(f"kernel {final.name}", enabled=progress) as bar, cache.staging(final) as out:
            _build_into(out, tarball, logfile, bar)
            shutil.copy2(logfile, out / "build.log")
        logfile.unlink()
    found = cached_kernel(tarball)
    assert found is not None
    return found
