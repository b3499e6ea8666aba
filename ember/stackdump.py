"""SIGUSR2 writes every thread's Python stack to stderr: where a running VMM is stuck.

Installed by the command-line entry points; a VM that stops making progress can
be asked (``kill -USR2 PID``) what its vCPU, event-loop and API threads are
doing, without stopping it. The system tests send it before they kill a VMM
that outlived its time limit, so a hang in CI comes with its stacks.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

STACK_DUMP_SIGNAL = signal.SIGUSR2


def install() -> None:
    """Dump all threads' stacks to the process's standard error (fd 2, whatever sys.stderr
    was replaced with) on STACK_DUMP_SIGNAL; the process keeps running."""
    try:
        faulthandler.register(STACK_DUMP_SIGNAL, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no usable fd 2 (closed, or not a file)
        pass
