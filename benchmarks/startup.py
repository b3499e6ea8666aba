"""Start-up to the API socket: spawn until connect() succeeds on the control socket.

Ember's ``ember firecracker --api-sock`` (Firecracker's API) against QEMU's
QMP socket (-qmp unix:..., -S: nothing runs), beside Python's own start-up
(`python -c pass`, and importing Ember's API server) as baselines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.console import BenchError
from benchmarks.progress import Steps
from benchmarks.results import Measure, Results
from benchmarks.vmm import QEMU

POLL_S = 0.001
TIMEOUT_S = 60.0
MS_PER_S = 1000


def _connect_ok(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def time_to_socket(argv: list[str], path: Path) -> float:
    """Milliseconds from spawn until ``path`` accepts a connection; the process is then stopped."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not _connect_ok(path):
            if proc.poll() is not None:
                why = proc.stderr.read().decode(errors="replace")[-500:]
                raise BenchError(f"{argv[0]} exited before its socket was up: {why}")
            if time.monotonic() - start > TIMEOUT_S:
                raise BenchError(f"{argv[0]}: no socket at {path} within {TIMEOUT_S:g} s")
            time.sleep(POLL_S)
        return (time.monotonic() - start) * MS_PER_S
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def time_to_exit(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return (time.monotonic() - start) * MS_PER_S


def ember_argv(sock: Path) -> list[str]:
    return [sys.executable, "-m", "ember", "firecracker", "--api-sock", str(sock)]


def qemu_argv(sock: Path) -> list[str]:
    return [QEMU, "-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off"]


def measure_startup(results: Results, runs: int, where: str, steps: Steps) -> None:
    api = results.add(Measure("startup_api", "Start-up to API socket (Ember Firecracker API vs QEMU QMP)",
                              "ms", "lower", where, note="spawn until connect() succeeds; QEMU with -S"))
    bare = results.add(Measure("startup_python", "Baseline: `python -c pass`", "ms", "lower", where,
                               reference_name="—"))
    imports = results.add(Measure("startup_import", "Baseline: `python -c 'import ember.api.server'`", "ms",
                                  "lower", where, reference_name="—"))
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        for index in range(runs):
            sock = Path(tmp) / f"api-{index}.sock"
            api.ember.append(time_to_socket(ember_argv(sock), sock))
            qmp = Path(tmp) / f"qmp-{index}.sock"
            api.reference.append(time_to_socket(qemu_argv(qmp), qmp))
            bare.ember.append(time_to_exit([sys.executable, "-c", "pass"]))
            imports.ember.append(time_to_exit([sys.executable, "-c", "import ember.api.server"]))
            steps.step(f"start-up run {index + 1}: Ember API {api.ember[-1]:.0f} ms, "
                       f"QEMU QMP {api.reference[-1]:.0f} ms")
