"""How a microVM ended: the reason (power-off, reboot, triple fault, panic, ...) and status.

The CLI turns an outcome into its exit status (see ``exit_code``), so a script
can tell a guest that powered off from one that rebooted or crashed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitReason(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    TRIPLE_FAULT = "triple-fault"
    PANIC = "panic"
    STOPPED = "stopped"
    ERROR = "error"


# `ember run` exit statuses for outcomes other than a power-off with a guest status.
EXIT_CODES = {
    ExitReason.POWEROFF: 0,
    ExitReason.STOPPED: 0,
    ExitReason.REBOOT: 64,
    ExitReason.TRIPLE_FAULT: 65,
    ExitReason.PANIC: 66,
    ExitReason.ERROR: 70,
}


@dataclass(frozen=True)
class ExitInfo:
    reason: ExitReason
    status: int | None = None
    detail: str = ""

    @property
    def exit_code(self) -> int:
        """The process exit status that reports this outcome."""
        if self.reason is ExitReason.POWEROFF and self.status is not None:
            return self.status & 0xFF
        return EXIT_CODES[self.reason]

    def describe(self) -> str:
        text = f"guest {self.reason.value}"
        if self.status is not None:
            text += f" (status {self.status})"
        if self.detail:
            text += f": {self.detail}"
        return text
