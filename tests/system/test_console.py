"""The serial console both ways on a terminal: typed input reaches the guest's shell,
its output comes back, and the terminal's mode is restored when the VM ends."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.system


def read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{marker!r} not seen; got {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_interactive_shell_over_the_serial_console():
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    vm = subprocess.Popen([sys.executable, "-m", "ember", "run", "--no-rig"],
                          stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    try:
        read_until(master, b"#", timeout=180)  # the root shell's prompt
        os.write(master, b"echo typed-$((40+2))\r")
        read_until(master, b"typed-42", timeout=60)
        os.write(master, b"poweroff\r")
        assert vm.wait(timeout=60) == 0
        assert termios.tcgetattr(slave) == before, "terminal mode not restored"
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        os.close(master)
        os.close(slave)
