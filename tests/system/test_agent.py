"""`ember exec`: commands run in a running guest through the guest agent."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.system.vmproc import run_ember, expect_ember_status

pytestmark = pytest.mark.system


def ember(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_ember(*args, timeout=timeout)


def test_exec_returns_stdout_stderr_and_status(tmp_path):
    sock = str(tmp_path / "agent.sock")
    vm = subprocess.Popen([sys.executable, "-m", "ember", "run", "--no-rig", "--vcpus", "2",
                           "--console", f"file:{tmp_path / 'console.log'}", "--agent-sock", sock],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.2)
        first = ember("exec", "--agent-sock", sock, "--timeout", "120", "--", "echo out-$((6*7)); echo err >&2; exit 5")
        assert first.returncode == 5, first.stderr
        assert first.stdout == "out-42\n"
        assert first.stderr == "err\n"
        second = ember("exec", "--agent-sock", sock, "--", "nproc")
        assert second.returncode == 0 and second.stdout.strip() == "2"
        ember("exec", "--agent-sock", sock, "--timeout", "10", "--", "poweroff")
        expect_ember_status(vm, 0, 60, tmp_path / "console.log")
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
