"""Ember processes in the system tests, and what a hung one leaves behind.

A VMM that outlives its time limit is asked for its threads' stacks (SIGUSR2,
ember.stackdump) before it is killed, and the test fails with those stacks,
the tail of its output and of the guest console: a hang in CI explains itself.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ember.stackdump import STACK_DUMP_SIGNAL

EMBER = (sys.executable, "-m", "ember")
STACK_WAIT_S = 3.0
TAIL_CHARS = 4000


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL_CHARS:]


def _hung(proc: subprocess.Popen, timeout: float, console: Path | None) -> AssertionError:
    """Stop a hung Ember process and describe it."""
    proc.send_signal(STACK_DUMP_SIGNAL)
    time.sleep(STACK_WAIT_S)
    proc.kill()
    out, err = proc.communicate(timeout=30)
    guest = console.read_text(errors="replace") if console is not None and console.exists() else ""
    return AssertionError(f"{' '.join(map(str, proc.args))} did not end within {timeout:g} s.\n"
                          f"--- its stderr (thread stacks last) ---\n{_tail(err)}\n"
                          f"--- its stdout ---\n{_tail(out)}\n--- the guest console ---\n{_tail(guest)}")


def run_ember(*args: str, timeout: float, prefix: tuple[str, ...] = (),
              console: Path | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` of ``prefix + python -m ember args``, text output captured."""
    proc = subprocess.Popen([*prefix, *EMBER, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _hung(proc, timeout, console) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def expect_ember_status(proc: subprocess.Popen, status: int, timeout: float, console: Path | None = None) -> None:
    """Wait for an Ember started with stdout and stderr piped; fail, with its output and the
    guest console, unless it ended with ``status`` (its stderr says how the guest ended)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _hung(proc, timeout, console) from None
    if proc.returncode != status:
        guest = console.read_text(errors="replace") if console is not None and console.exists() else ""
        raise AssertionError(f"{' '.join(map(str, proc.args))} ended with status {proc.returncode}, not {status}.\n"
                             f"--- its stderr ---\n{_tail(err)}\n--- its stdout ---\n{_tail(out)}\n"
                             f"--- the guest console ---\n{_tail(guest)}")
