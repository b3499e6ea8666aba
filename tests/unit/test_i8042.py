"""Unit tests for the i8042 PS/2 controller (ember.devices.legacy.i8042)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.devices.bus import Bus
from ember.devices.legacy import i8042 as kbc
from ember.devices.legacy.i8042 import I8042, I8042State

DATA, STATUS = kbc.I8042_BASE, kbc.I8042_BASE + kbc.STATUS_OFFSET


class RecordingIrqLine:
    def __init__(self) -> None:
        self.edges = 0

    def trigger(self) -> None:
        self.edges += 1

    def set_level(self, high: bool) -> None:
        raise AssertionError("IRQ 1 is edge-triggered")


class Controller:
    def __init__(self, irq: RecordingIrqLine | None = None) -> None:
        self.resets = 0
        self.dev = I8042(self._reset, irq)
        self.bus = Bus("pio")
        self.bus.register(kbc.I8042_BASE, kbc.I8042_SIZE, self.dev, "i8042")

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)[0]

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, bytes((value,)))


def test_reset_command_calls_on_reset() -> None:
    c = Controller()
    c.outb(STATUS, 0xFE)
    assert c.resets == 1


@pytest.mark.parametrize("command", [0xF0, 0xF2, 0xFC, 0xFE])
def test_pulse_commands_with_bit0_clear_reset(command: int) -> None:
    c = Controller()
    c.outb(STATUS, command)
    assert c.resets == 1


@pytest.mark.parametrize("command", [0xFF, 0xF1, 0xFD, 0xAA, 0xAD, 0xA7, 0x00])
def test_other_commands_are_ignored(command: int) -> None:
    c = Controller()
    c.outb(STATUS, command)
    assert c.resets == 0


def test_writing_the_output_port_with_reset_low_resets() -> None:
    c = Controller()
    c.outb(STATUS, kbc.CMD_WRITE_OUTP)
    assert c.inb(STATUS) & kbc.STATUS_COMMAND_DATA
    c.outb(DATA, 0x03)  # reset line high: fine
    assert c.resets == 0
    c.outb(STATUS, kbc.CMD_READ_OUTP)
    assert c.inb(DATA) == 0x03
    c.outb(STATUS, kbc.CMD_WRITE_OUTP)
    c.outb(DATA, 0x02)
    assert c.resets == 1


def test_status_is_sane_and_buffer_empty_at_start() -> None:
    c = Controller()
    status = c.inb(STATUS)
    assert not status & kbc.STATUS_OUTPUT_FULL
    assert not status & 0x02  # input buffer never full: Linux never waits


def test_control_register_round_trip() -> None:
    c = Controller()
    c.outb(STATUS, kbc.CMD_READ_CTR)
    assert c.inb(STATUS) & kbc.STATUS_OUTPUT_FULL
    assert c.inb(DATA) == kbc.CTR_POST_OK | kbc.CTR_KBD_INT
    assert not c.inb(STATUS) & kbc.STATUS_OUTPUT_FULL
    c.outb(STATUS, kbc.CMD_WRITE_CTR)
    c.outb(DATA, 0x52)
    c.outb(STATUS, kbc.CMD_READ_CTR)
    assert c.inb(DATA) == 0x52


def test_keyboard_bytes_are_acked_with_an_interrupt() -> None:
    irq = RecordingIrqLine()
    c = Controller(irq)
    c.outb(DATA, 0xF4)
    assert irq.edges == 1
    assert c.inb(DATA) == kbc.KBD_ACK
    assert c.inb(DATA) == 0  # empty buffer reads 0


def test_ctrl_alt_del_types_the_scancodes() -> None:
    irq = RecordingIrqLine()
    c = Controller(irq)
    assert c.dev.send_ctrl_alt_del()
    assert irq.edges == 1
    got = [c.inb(DATA) for _ in kbc.SCANCODES_CTRL_ALT_DEL]
    assert tuple(got) == kbc.SCANCODES_CTRL_ALT_DEL
    assert irq.edges == 4  # one more edge per byte still waiting after a read
    assert not Controller(None).dev.send_ctrl_alt_del()


def test_wide_and_unknown_accesses_are_ignored() -> None:
    c = Controller()
    assert c.bus.read(DATA, 2) == b"\xff\xff"
    c.bus.write(DATA, b"\xfe\xfe")
    c.outb(DATA + 1, 0xFE)
    assert c.resets == 0
    assert c.dev.ignored == 3


def test_state_round_trip() -> None:
    c = Controller()
    c.outb(STATUS, kbc.CMD_WRITE_CTR)
    c.outb(DATA, 0x47)
    c.outb(STATUS, kbc.CMD_READ_CTR)
    blob = msgspec.json.encode(c.dev.state)
    other = I8042(lambda: None)
    other.restore(msgspec.json.decode(blob, type=I8042State))
    assert other.state == c.dev.state
    assert other.read(kbc.DATA_OFFSET, 1) == b"\x47"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.binary(min_size=1, max_size=2))))
def test_random_port_traffic_never_raises(ops: list) -> None:
    c = Controller(RecordingIrqLine())
    for is_write, offset, data in ops:
        if is_write:
            c.bus.write(kbc.I8042_BASE + offset, data)
        else:
            assert len(c.bus.read(kbc.I8042_BASE + offset, len(data))) == len(data)
    assert c.bus.errors == 0
