"""Ember's guest init script, run under busybox sh with a fake /proc/cmdline.

The script only runs its main when it is PID 1, so sourcing it defines the
functions; devmem, reboot and sync are replaced by shell functions that log.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
INIT = Path(str(resources.files("ember.images").joinpath("init")))
pytestmark = pytest.mark.skipif(not Path(BUSYBOX).exists(),
                                reason="busybox is not installed (apt-get install busybox-static)")

STUBS = r'''
devmem() { echo "devmem $*" >>"$LOG"; }
sync() { echo sync >>"$LOG"; }
reboot() { echo "reboot $*" >>"$LOG"; exit 0; }
'''


def run_init(tmp_path: Path, cmdline: str, body: str, timeout: float = 20) -> tuple[subprocess.CompletedProcess, str]:
    """Source init, point it at a fake cmdline and stubs, then run ``body``."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    log = tmp_path / "log"
    log.write_text("")
    script = f'. "{INIT}"\nEMBER_CMDLINE="{tmp_path}/cmdline"\nEMBER_CONSOLE=/dev/null\nLOG="{log}"\n{STUBS}\n{body}\n'
    proc = subprocess.run([BUSYBOX, "sh", "-c", script], capture_output=True, text=True, timeout=timeout)
    return proc, log.read_text()


def b64(text: str, urlsafe: bool = False, strip: bool = False) -> str:
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    out = enc(text.encode()).decode()
    return out.rstrip("=") if strip else out


def test_sourcing_does_not_run_main(tmp_path):
    proc, log = run_init(tmp_path, "console=ttyS0", "echo sourced")
    assert proc.stdout == "sourced\n" and log == ""


@pytest.mark.parametrize("urlsafe,strip", [(False, False), (True, False), (True, True), (False, True)])
def test_ember_cmd_decodes_both_alphabets(tmp_path, urlsafe, strip):
    cmd = "echo 'a>b?' && printf '%s\\n' ~~~ ??? | cat; exit 3"
    cmdline = f"console=ttyS0 reboot=k ember.cmd={b64(cmd, urlsafe, strip)} panic=1"
    proc, _ = run_init(tmp_path, cmdline, "ember_cmd")
    assert proc.returncode == 0
    assert proc.stdout == cmd + "\n" or proc.stdout == cmd


def test_ember_param_absent_and_prefix(tmp_path):
    body = 'ember_param ember.cmd; echo "rc=$?"; ember_param ember.agent; ember_param ember'
    proc, _ = run_init(tmp_path, "ember.commander=x ember.agent=1 root=/dev/vda *", body)
    assert proc.stdout == "rc=1\n1\n"


def test_ember_cmd_rejects_bad_base64(tmp_path):
    proc, _ = run_init(tmp_path, "ember.cmd=a", 'ember_cmd; echo "rc=$?"')
    assert proc.stdout.endswith("rc=2\n")


def test_cmd_status_is_written_then_reset(tmp_path):
    cmd = "echo hi; exit 42"
    proc, log = run_init(tmp_path, f"ember.cmd={b64(cmd)}", "ember_traps; ember_run_cmd")
    assert log.splitlines() == ["sync", "devmem 0xd0000010 32 42", "reboot -f"]
    assert "status 42" in proc.stdout


def test_bad_cmd_powers_off_with_127(tmp_path):
    _, log = run_init(tmp_path, "ember.cmd=@@@", "ember_run_cmd")
    assert "devmem 0xd0000010 32 127" in log.splitlines()


@pytest.mark.parametrize("signal,expected", [
    ("USR2", ["sync", "devmem 0xd0000010 32 0", "reboot -f"]),   # busybox poweroff
    ("USR1", ["sync", "devmem 0xd0000010 32 0", "reboot -f"]),   # busybox halt
    ("TERM", ["sync", "reboot -f"]),                             # busybox reboot: no status
])
def test_poweroff_signals_interrupt_a_running_command(tmp_path, signal, expected):
    cmd = f"kill -{signal} $PPID; sleep 10"
    proc, log = run_init(tmp_path, f"ember.cmd={b64(cmd)}", "ember_traps; ember_run_cmd", timeout=8)
    assert log.splitlines() == expected


def test_setup_marks_boot_complete_through_devmem(tmp_path):
    body = "ember_mount() { :; }; hostname() { :; }; ember_setup"
    _, log = run_init(tmp_path, "", body)
    assert log.splitlines() == ["devmem 0xd0000000 8 123"]
