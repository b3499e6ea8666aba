"""Unit tests for the boot-timer / guest-signal device (ember.devices.legacy.boot_timer)."""

from __future__ import annotations

import struct

import msgspec

from ember.devices.bus import Bus
from ember.devices.legacy import boot_timer as bt
from ember.devices.legacy.boot_timer import BootTimer, BootTimerState


class Recorder:
    def __init__(self) -> None:
        self.boots: list[int] = []
        self.statuses: list[int] = []
        self.now = 1_000

    def clock(self) -> int:
        self.now += 7
        return self.now

    def device(self) -> BootTimer:
        return BootTimer(self.boots.append, self.statuses.append, clock_ns=self.clock)


def mmio(dev: BootTimer) -> Bus:
    bus = Bus("mmio")
    bus.register(bt.BOOT_TIMER_BASE, bt.BOOT_TIMER_SIZE, dev, "boot-timer")
    return bus


def test_magic_write_reports_boot_complete_once() -> None:
    r = Recorder()
    bus = mmio(r.device())
    bus.write(bt.BOOT_TIMER_BASE, bytes((bt.BOOT_COMPLETE_MAGIC,)))
    bus.write(bt.BOOT_TIMER_BASE, bytes((bt.BOOT_COMPLETE_MAGIC,)))
    assert r.boots == [1_007]


def test_other_values_do_not_signal_boot() -> None:
    r = Recorder()
    dev = r.device()
    bus = mmio(dev)
    bus.write(bt.BOOT_TIMER_BASE, b"\x7a")
    bus.write(bt.BOOT_TIMER_BASE + 1, bytes((bt.BOOT_COMPLETE_MAGIC,)))
    bus.write(bt.BOOT_TIMER_BASE + 0x10, b"\x01")  # exit status needs 32 bits
    assert r.boots == [] and r.statuses == []
    assert dev.ignored == 3


def test_exit_status_is_a_32_bit_little_endian_write() -> None:
    r = Recorder()
    dev = r.device()
    bus = mmio(dev)
    bus.write(bt.BOOT_TIMER_BASE + bt.EXIT_STATUS_OFFSET, struct.pack("<I", 3))
    assert r.statuses == [3]
    assert dev.state.exit_status == 3


def test_reads_return_zero() -> None:
    bus = mmio(BootTimer())
    assert bus.read(bt.BOOT_TIMER_BASE, 4) == b"\0" * 4
    assert bus.read(bt.BOOT_TIMER_BASE + 0xFF8, 8) == b"\0" * 8


def test_callbacks_are_optional_and_default_clock_is_monotonic() -> None:
    dev = BootTimer()
    dev.write(0, bytes((bt.BOOT_COMPLETE_MAGIC,)))
    dev.write(bt.EXIT_STATUS_OFFSET, struct.pack("<I", 0))
    assert dev.state == BootTimerState(boot_complete=True, exit_status=0)


def test_state_round_trip_keeps_boot_signalled() -> None:
    r = Recorder()
    dev = r.device()
    dev.write(0, bytes((bt.BOOT_COMPLETE_MAGIC,)))
    other = r.device()
    other.restore(msgspec.json.decode(msgspec.json.encode(dev.state), type=BootTimerState))
    other.write(0, bytes((bt.BOOT_COMPLETE_MAGIC,)))
    assert len(r.boots) == 1
