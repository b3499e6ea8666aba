"""SIGUSR2 writes every thread's Python stack to stderr: where a running VMM is stuck.

Installed by the command-line entry points; a VM that stops making progress can
be asked (``kill -USR2 PID``) what its vCPU, event-loop and API threads are
doing, without stopping it. After the stacks come the reports running machines
registered (their virtqueues' indices and interrupt state): who waits for whom.
The system tests send it before they kill a VMM that outlived its time limit,
so a hang in CI comes with its stacks and its device state.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from typing import Callable

STACK_DUMP_SIGNAL = signal.SIGUSR2

_reports: list[Callable[[], str]] = []
_installed = False


def install() -> None:
    """Dump all threads' stacks to the process's standard error (fd 2, whatever sys.stderr
    was replaced with) on STACK_DUMP_SIGNAL, then the registered reports; the process
    keeps running. The stacks come from C, so a thread that holds the interpreter
    cannot hide them; the reports from Python, in the main thread, when it next runs."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(STACK_DUMP_SIGNAL, _write_reports)
        faulthandler.register(STACK_DUMP_SIGNAL, file=sys.__stderr__, all_threads=True, chain=True)
    except (AttributeError, ValueError, OSError):  # no usable fd 2 (closed, or not a file)
        return
    _installed = True


def add_report(report: Callable[[], str]) -> None:
    """Have ``report()`` written after the stacks, until remove_report."""
    _reports.append(report)


def remove_report(report: Callable[[], str]) -> None:
    if report in _reports:
        _reports.remove(report)


def _write_reports(signum, frame) -> None:
    for report in list(_reports):
        try:
            text = report()
        except Exception as exc:  # a half-built or closing machine
            text = f"(report failed: {exc!r})"
        try:
            sys.__stderr__.write(text.rstrip("\n") + "\n")
            sys.__stderr__.flush()
        except (AttributeError, ValueError, OSError):
            return
