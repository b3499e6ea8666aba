"""The boot-timer device: the guest tells the VMM that it booted, and how it exits.

Firecracker's boot timer (src/vmm/src/devices/pseudo/boot_timer.rs): the guest's
init writes the magic byte 123 at offset 0 of an MMIO page at 0xd0000000 once it
is up. Ember's extension: a 32-bit write at offset 0x10 records the guest's exit
status, written just before the i8042 reset that stands in for power-off.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import msgspec

log = logging.getLogger(__name__)

BOOT_TIMER_BASE = 0xD000_0000
BOOT_TIMER_SIZE = 0x1000

BOOT_COMPLETE_OFFSET = 0x0
BOOT_COMPLETE_MAGIC = 123
EXIT_STATUS_OFFSET = 0x10
EXIT_STATUS_SIZE = 4


class BootTimerState(msgspec.Struct):
    """What the guest has signalled so far."""

    boot_complete: bool = False
    exit_status: int | None = None


class BootTimer:
    """Calls ``on_boot_complete(monotonic_ns)`` once and ``on_exit_status(status)``."""

    def __init__(
        self,
        on_boot_complete: Callable[[int], None] | None = None,
        on_exit_status: Callable[[int], None] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._on_boot_complete = on_boot_complete
        self._on_exit_status = on_exit_status
        self._clock_ns = clock_ns
        self._s = BootTimerState()
        self.ignored = 0

    def read(self, offset: int, size: int) -> bytes:
        """Every register reads as zero."""
        return bytes(max(size, 0))

    def write(self, offset: int, data: bytes) -> None:
        """Record the boot-complete magic or an exit status; ignore anything else."""
        if offset == BOOT_COMPLETE_OFFSET and data[:1] == bytes((BOOT_COMPLETE_MAGIC,)):
            self._boot_complete()
        elif offset == EXIT_STATUS_OFFSET and len(data) == EXIT_STATUS_SIZE:
            self._exit_status(int.from_bytes(data, "little"))
        else:
            self.ignored += 1
            log.debug("boot timer: ignoring %d-byte write at %#x", len(data), offset)

    @property
    def state(self) -> BootTimerState:
        """A copy of the device state."""
        return msgspec.structs.replace(self._s)

    def restore(self, state: BootTimerState) -> None:
        """Load a state saved by ``state``."""
        self._s = msgspec.structs.replace(state)

    def _boot_complete(self) -> None:
        if self._s.boot_complete:
            self.ignored += 1
            return
        now = self._clock_ns()
        self._s.boot_complete = True
        log.info("boot timer: guest signalled boot complete")
        if self._on_boot_complete is not None:
            self._on_boot_complete(now)

    def _exit_status(self, status: int) -> None:
        self._s.exit_status = status
        log.info("boot timer: guest exit status %d", status)
        if self._on_exit_status is not None:
            self._on_exit_status(status)
