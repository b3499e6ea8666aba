"""Unit tests for ember.devices.bus: dispatch, overlaps, unmapped and straddling accesses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.devices.bus import Bus


class Memory:
    """A device that stores what is written and records every access."""

    def __init__(self, size: int) -> None:
        self.cells = bytearray(size)
        self.accesses: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.accesses.append(("r", offset, size))
        return bytes(self.cells[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.accesses.append(("w", offset, len(data)))
        self.cells[offset : offset + len(data)] = data


class Broken:
    def read(self, offset: int, size: int) -> bytes:
        raise RuntimeError("device bug")

    def write(self, offset: int, data: bytes) -> None:
        raise RuntimeError("device bug")


class Short:
    def read(self, offset: int, size: int) -> bytes:
        return b"\x01"

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_dispatch_passes_offset_relative_to_base() -> None:
    bus = Bus("pio")
    low, high = Memory(8), Memory(16)
    bus.register(0x3F8, 8, low, "com1")
    bus.register(0x1000, 16, high, "high")
    assert bus.write(0x3FA, b"\x12\x34")
    assert bus.read(0x3FA, 2) == b"\x12\x34"
    assert low.accesses == [("w", 2, 2), ("r", 2, 2)]
    assert bus.write(0x100F, b"\x55")
    assert high.accesses == [("w", 15, 1)]
    assert bus.stats() == {"com1": (1, 1), "high": (0, 1)}
    assert bus.unhandled == 0


def test_unmapped_reads_float_high_and_writes_are_dropped() -> None:
    bus = Bus()
    dev = Memory(4)
    bus.register(0x100, 4, dev)
    assert bus.read(0xFF, 1) == b"\xff"
    assert bus.read(0x104, 4) == b"\xff" * 4
    assert bus.read(0, 8) == b"\xff" * 8
    assert not bus.write(0x104, b"\x00")
    assert not bus.write(0x50, b"\x00\x00")
    assert bus.unhandled == 5
    assert dev.accesses == []


def test_access_straddling_a_device_end_is_unhandled() -> None:
    bus = Bus()
    dev = Memory(4)
    bus.register(0x100, 4, dev)
    bus.register(0x104, 4, Memory(4))
    assert bus.read(0x102, 4) == b"\xff" * 4
    assert not bus.write(0x103, b"\x01\x02")
    assert bus.read(0x103, 1) == b"\x00"  # the last byte itself is fine
    assert bus.unhandled == 2
    assert dev.accesses == [("r", 3, 1)]


@pytest.mark.parametrize(
    ("base", "size"),
    [(0x100, 4), (0xFE, 4), (0x102, 1), (0x103, 8), (0xF0, 0x100)],
)
def test_overlapping_registration_is_rejected(base: int, size: int) -> None:
    bus = Bus()
    bus.register(0x100, 4, Memory(4), "first")
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(base, size, Memory(size), "second")
    assert bus.mappings() == [(0x100, 4, "first")]


def test_adjacent_ranges_are_fine() -> None:
    bus = Bus()
    bus.register(0x100, 4, Memory(4), "a")
    bus.register(0xFC, 4, Memory(4), "b")
    bus.register(0x104, 4, Memory(4), "c")
    assert [m[0] for m in bus.mappings()] == [0xFC, 0x100, 0x104]


@pytest.mark.parametrize(("base", "size"), [(0, 0), (0, -1), (-1, 4), ((1 << 64) - 2, 4)])
def test_bad_ranges_are_rejected(base: int, size: int) -> None:
    with pytest.raises(ValueError):
        Bus().register(base, size, Memory(4))


def test_duplicate_names_are_rejected() -> None:
    bus = Bus()
    bus.register(0, 1, Memory(1), "x")
    with pytest.raises(ValueError, match="already"):
        bus.register(8, 1, Memory(1), "x")


def test_unregister_removes_the_device() -> None:
    bus = Bus()
    dev = Memory(4)
    bus.register(0x20, 4, dev, "dev")
    assert bus.unregister(0x20) is dev
    assert bus.read(0x20, 1) == b"\xff"
    assert bus.stats() == {}
    with pytest.raises(ValueError):
        bus.unregister(0x20)
    bus.register(0x20, 4, Memory(4), "dev")  # the range and name are free again


def test_device_exceptions_do_not_reach_the_vcpu() -> None:
    bus = Bus()
    bus.register(0x10, 4, Broken(), "broken")
    assert bus.read(0x10, 2) == b"\xff\xff"
    assert not bus.write(0x10, b"\x00")
    assert bus.errors == 2


def test_wrong_length_device_reads_are_fixed_up() -> None:
    bus = Bus()
    bus.register(0x10, 4, Short(), "short")
    assert bus.read(0x10, 4) == b"\x01\xff\xff\xff"


@st.composite
def operations(draw: st.DrawFn) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["register", "unregister", "read", "write"]))
        addr = draw(st.integers(-4, 0x140))
        if kind == "register":
            ops.append((kind, addr, draw(st.integers(-2, 0x40))))
        elif kind == "unregister":
            ops.append((kind, addr, 0))
        elif kind == "read":
            ops.append((kind, addr, draw(st.integers(-1, 9))))
        else:
            ops.append((kind, addr, draw(st.binary(max_size=9))))
    return ops


@settings(max_examples=300, deadline=None)
@given(operations())
def test_random_sequences_only_raise_value_error_on_bad_registration(ops: list[tuple]) -> None:
    bus = Bus()
    model: dict[int, tuple[int, Memory]] = {}
    for n, (kind, addr, arg) in enumerate(ops):
        if kind == "register":
            dev = Memory(max(arg, 0))
            try:
                bus.register(addr, arg, dev, f"d{n}")
            except ValueError:
                ok = arg > 0 and addr >= 0 and all(addr + arg <= b or b + s <= addr for b, (s, _) in model.items())
                assert not ok, "a valid registration was refused"
            else:
                model[addr] = (arg, dev)
        elif kind == "unregister":
            try:
                bus.unregister(addr)
                del model[addr]
            except ValueError:
                assert addr not in model
        elif kind == "read":
            data = bus.read(addr, arg)
            assert len(data) == max(arg, 0)
            owner = _owner(model, addr, arg)
            if owner is None:
                assert data == b"\xff" * max(arg, 0)
            else:
                base, dev = owner
                assert data == bytes(dev.cells[addr - base : addr - base + arg])
        else:
            handled = bus.write(addr, arg)
            assert handled == (_owner(model, addr, len(arg)) is not None)


def _owner(model: dict[int, tuple[int, Memory]], addr: int, size: int) -> tuple[int, Memory] | None:
    for base, (length, dev) in model.items():
        if size > 0 and base <= addr and addr + size <= base + length:
            return base, dev
    return None
