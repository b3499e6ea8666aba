"""The I/O buses: guest port I/O (PIO) and MMIO address ranges mapped to devices.

A vCPU exit with KVM_EXIT_IO or KVM_EXIT_MMIO (KVM API documentation, section
5 "The kvm_run structure") is dispatched here to the device whose range holds
the address. One ``Bus`` class serves both spaces; the machine builds two.
Unclaimed accesses behave like a floating ISA bus: reads give all-ones bytes.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from typing import Protocol

log = logging.getLogger(__name__)

ADDRESS_LIMIT = 1 << 64
"""Ranges must end at or below this address (64-bit physical/port space)."""

FLOATING_BYTE = b"\xff"
"""What a read from an address no device claims returns, per byte."""


class BusDevice(Protocol):
    """What the bus needs from a device: register access at an offset."""

    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read at ``offset`` within the device's range."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Accept ``data`` written at ``offset`` within the device's range."""
        ...


class _Mapping:
    """One registered range and its access counters."""

    __slots__ = ("base", "end", "device", "name", "reads", "writes")

    def __init__(self, base: int, size: int, device: BusDevice, name: str) -> None:
        self.base = base
        self.end = base + size
        self.device = device
        self.name = name
        self.reads = 0
        self.writes = 0


class Bus:
    """Address ranges mapped to devices, looked up by bisection on the bases.

    Registration replaces the lookup table as a whole (copy on write), so the
    vCPU threads read it without a lock while another thread registers.
    """

    def __init__(self, name: str = "bus") -> None:
        self.name = name
        self.unhandled = 0
        """Accesses that hit no device, or ran past a device's end."""
        self.errors = 0
        """Accesses whose device raised (a device bug, logged with its traceback)."""
        self._table: tuple[list[int], list[_Mapping]] = ([], [])

    def register(self, base: int, size: int, device: BusDevice, name: str | None = None) -> None:
        """Map ``[base, base + size)`` to ``device``; ValueError if it cannot be."""
        name = name if name is not None else f"{type(device).__name__}@{base:#x}"
        self._check_range(base, size)
        bases, maps = self._table
        if any(m.name == name for m in maps):
            raise ValueError(f"{self.name}: a device named {name!r} is already registered")
        for m in maps:
            if base < m.end and m.base < base + size:
                raise ValueError(
                    f"{self.name}: {name} at {base:#x}+{size:#x} overlaps "
                    f"{m.name} at {m.base:#x}+{m.end - m.base:#x}"
                )
        new_maps = sorted([*maps, _Mapping(base, size, device, name)], key=lambda m: m.base)
        self._table = ([m.base for m in new_maps], new_maps)
        log.debug("%s: registered %s at %#x+%#x", self.name, name, base, size)

    def unregister(self, base: int) -> BusDevice:
        """Remove the range starting at ``base`` and return its device."""
        bases, maps = self._table
        i = bisect_right(bases, base) - 1
        if i < 0 or bases[i] != base:
            raise ValueError(f"{self.name}: no device registered at {base:#x}")
        removed = maps[i]
        new_maps = maps[:i] + maps[i + 1 :]
        self._table = ([m.base for m in new_maps], new_maps)
        log.debug("%s: unregistered %s at %#x", self.name, removed.name, base)
        return removed.device

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes at ``addr``; all-ones if no device claims them."""
        m = self._find(addr, size)
        if m is None:
            return self._unhandled("read", addr, size)
        m.reads += 1
        try:
            data = m.device.read(addr - m.base, size)
        except Exception:
            return self._device_error(m, "read", addr, size)
        if len(data) != size:
            log.warning("%s: %s returned %d bytes for a %d-byte read", self.name, m.name, len(data), size)
            data = (bytes(data) + FLOATING_BYTE * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> bool:
        """Write ``data`` at ``addr``; False (and ignored) if no device claims it."""
        m = self._find(addr, len(data))
        if m is None:
            self._unhandled("write", addr, len(data))
            return False
        m.writes += 1
        try:
            m.device.write(addr - m.base, data)
        except Exception:
            self._device_error(m, "write", addr, len(data))
            return False
        return True

    def stats(self) -> dict[str, tuple[int, int]]:
        """Per-device access counts: name -> (reads, writes)."""
        return {m.name: (m.reads, m.writes) for m in self._table[1]}

    def mappings(self) -> list[tuple[int, int, str]]:
        """The registered ranges as (base, size, name), in address order."""
        return [(m.base, m.end - m.base, m.name) for m in self._table[1]]

    def _find(self, addr: int, size: int) -> _Mapping | None:
        bases, maps = self._table
        i = bisect_right(bases, addr) - 1
        if i < 0 or size <= 0:
            return None
        m = maps[i]
        return m if addr + size <= m.end else None

    def _unhandled(self, kind: str, addr: int, size: int) -> bytes:
        self.unhandled += 1
        log.debug("%s: unhandled %s of %d bytes at %#x", self.name, kind, size, addr)
        return FLOATING_BYTE * max(size, 0)

    def _device_error(self, m: _Mapping, kind: str, addr: int, size: int) -> bytes:
        self.errors += 1
        log.exception("%s: %s failed on a %d-byte %s at %#x", self.name, m.name, size, kind, addr)
        return FLOATING_BYTE * max(size, 0)

    def _check_range(self, base: int, size: int) -> None:
        if size <= 0:
            raise ValueError(f"{self.name}: range size must be positive, got {size}")
        if base < 0 or base + size > ADDRESS_LIMIT:
            raise ValueError(f"{self.name}: range {base:#x}+{size:#x} is outside the address space")
