"""Just enough of the i8042 PS/2 keyboard controller to reboot and stop a guest.

Follows the Intel 8042 controller's command set as Linux's drivers/input/serio
(i8042.h) uses it, modelled on Firecracker's legacy i8042 device: port 0x60 is
data, port 0x64 status (read) and command (write). Pulsing the output port's
reset line (command 0xFE, any 0xF0-0xFF with bit 0 clear, or bit 0 cleared in
a written output port) ends the VM through ``on_reset``.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import msgspec

from ember.devices.irq import IrqLine

log = logging.getLogger(__name__)

I8042_BASE = 0x60
I8042_SIZE = 5
"""Ports 0x60-0x64; 0x61-0x63 belong to the PIT/speaker, which KVM handles in-kernel."""
KEYBOARD_IRQ = 1

DATA_OFFSET = 0
STATUS_OFFSET = 4

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_PULSE_FIRST = 0xF0
"""Commands 0xF0-0xFF pulse output-port bits 0-3 low where the command's bit is 0."""
OUTP_RESET_LINE = 0x01
"""Output port bit 0 is the CPU reset line (active low)."""

STATUS_OUTPUT_FULL = 0x01
STATUS_COMMAND_DATA = 0x08
"""Set while the controller waits for a command's parameter on port 0x60."""
STATUS_KBD_ENABLED = 0x10

CTR_KBD_INT = 0x01
CTR_POST_OK = 0x04
OUTP_DEFAULT = OUTP_RESET_LINE
"""Reset line high (inactive), A20 and the rest low."""

KBD_ACK = 0xFA
BUFFER_SIZE = 16

SCANCODES_CTRL_ALT_DEL = (0x14, 0x11, 0xE0, 0x71)
"""Set-2 make codes for Ctrl, Alt and the extended Delete key."""


class I8042State(msgspec.Struct):
    """Controller registers and the unread output buffer, for snapshots."""

    status: int = STATUS_KBD_ENABLED
    control: int = CTR_POST_OK | CTR_KBD_INT
    outp: int = OUTP_DEFAULT
    command: int = 0
    buffer: bytes = b""


class I8042:
    """The PS/2 controller: ``on_reset()`` is called when the guest resets the CPU.

    ``irq`` (IRQ 1) is optional; with it, ``send_ctrl_alt_del`` asks the
    guest to reboot itself through its keyboard driver.
    """

    def __init__(self, on_reset: Callable[[], None], irq: IrqLine | None = None) -> None:
        self._on_reset = on_reset
        self._irq = irq
        self._lock = threading.Lock()
        self._s = I8042State()
        self._buffer: collections.deque[int] = collections.deque()
        self.resets = 0
        self.ignored = 0

    def read(self, offset: int, size: int) -> bytes:
        """Read status (offset 4) or the next output byte (offset 0)."""
        if size != 1 or offset not in (DATA_OFFSET, STATUS_OFFSET):
            self.ignored += 1
            return b"\xff" * size
        with self._lock:
            if offset == STATUS_OFFSET:
                return bytes((self._s.status,))
            value = self._pop()
            more = bool(self._buffer)
        if more:
            self._interrupt()
        return bytes((value,))

    def write(self, offset: int, data: bytes) -> None:
        """Accept a controller command (offset 4) or a data byte (offset 0)."""
        if len(data) != 1 or offset not in (DATA_OFFSET, STATUS_OFFSET):
            self.ignored += 1
            return
        with self._lock:
            if offset == STATUS_OFFSET:
                reset, ack = self._command(data[0]), False
            else:
                reset, ack = self._data(data[0])
        if ack:
            self._interrupt()
        if reset:
            self._reset()

    def send_ctrl_alt_del(self) -> bool:
        """Type Ctrl-Alt-Del; False when the buffer is too full or no IRQ is wired."""
        with self._lock:
            if self._irq is None or BUFFER_SIZE - len(self._buffer) < len(SCANCODES_CTRL_ALT_DEL):
                return False
            for code in SCANCODES_CTRL_ALT_DEL:
                self._push(code)
        self._interrupt()
        return True

    @property
    def state(self) -> I8042State:
        """A copy of the device state."""
        with self._lock:
            return msgspec.structs.replace(self._s, buffer=bytes(self._buffer))

    def restore(self, state: I8042State) -> None:
        """Load a state saved by ``state``."""
        with self._lock:
            self._s = msgspec.structs.replace(state, buffer=b"")
            self._buffer = collections.deque(state.buffer[:BUFFER_SIZE])

    def _command(self, command: int) -> bool:
        """Run a controller command; True if it pulses the reset line."""
        s = self._s
        if command == CMD_READ_CTR:
            self._reply(s.control)
        elif command == CMD_READ_OUTP:
            self._reply(s.outp)
        elif command in (CMD_WRITE_CTR, CMD_WRITE_OUTP):
            self._buffer.clear()
            s.status = (s.status | STATUS_COMMAND_DATA) & ~STATUS_OUTPUT_FULL
            s.command = command
        elif command >= CMD_PULSE_FIRST:
            return not command & OUTP_RESET_LINE
        else:
            log.debug("i8042: ignoring command %#x", command)
        return False

    def _data(self, value: int) -> tuple[bool, bool]:
        """Take a data byte; returns (reset line pulsed, keyboard ack queued)."""
        s = self._s
        if s.status & STATUS_COMMAND_DATA:
            s.status &= ~STATUS_COMMAND_DATA
            if s.command == CMD_WRITE_CTR:
                s.control = value
            elif s.command == CMD_WRITE_OUTP:
                s.outp = value
                return not value & OUTP_RESET_LINE, False
            return False, False
        # A byte for the keyboard itself: a dumb keyboard acknowledges everything.
        self._reply(KBD_ACK)
        return False, True

    def _reply(self, value: int) -> None:
        self._buffer.clear()
        self._push(value)

    def _push(self, value: int) -> None:
        if len(self._buffer) < BUFFER_SIZE:
            self._buffer.append(value)
        self._s.status |= STATUS_OUTPUT_FULL

    def _pop(self) -> int:
        value = self._buffer.popleft() if self._buffer else 0
        if not self._buffer:
            self._s.status &= ~STATUS_OUTPUT_FULL
        return value

    def _interrupt(self) -> None:
        if self._irq is not None and self._s.control & CTR_KBD_INT:
            self._irq.trigger()

    def _reset(self) -> None:
        self.resets += 1
        log.info("i8042: guest pulsed the CPU reset line")
        self._on_reset()
