"""Guest physical memory: host mmaps registered with KVM as memory slots.

Regions follow KVM_SET_USER_MEMORY_REGION (Documentation/virt/kvm/api.rst
4.35) and dirty tracking KVM_GET_DIRTY_LOG (4.8). Every guest-supplied
address goes through view(), which bounds-checks it and raises
GuestMemoryError; no guest value can reach an IndexError or a host crash.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ConfigError, EmberError
from ember.kvm.structs import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE

log = logging.getLogger(__name__)

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.13 lacks it
HUGE_PAGE_SIZE = 2 << 20  # x86-64 transparent huge page
_BITS_PER_BYTE = 8
# Guest integers are little-endian, as this host is (x86-64); memoryview's native
# items are read and written with one load or store each.
_U16, _U32, _U64 = "H", "I", "Q"
_INT_SIZES = {_U16: 2, _U32: 4, _U64: 8}
assert sys.byteorder == "little", "guest integers are accessed in host order"


class GuestMemoryError(EmberError):
    """A guest physical address range that is not (entirely) inside one RAM region."""


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous range of guest RAM backed by one host mapping.

    The RAM is ``size`` bytes starting ``start`` bytes into the mapping (an
    anonymous mapping is padded so that RAM starts on a huge-page boundary).
    """

    gpa: int
    size: int
    slot: int
    mmap: mmap.mmap
    flags: int = 0
    file_offset: int | None = None
    start: int = 0
    view: memoryview = field(init=False, repr=False)
    host_addr: int = field(init=False, repr=False)
    """Host virtual address of the region's first byte (for KVM and iovecs)."""
    _anchor: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mmap)[self.start:self.start + self.size]
        self._anchor = ctypes.c_char.from_buffer(self.mmap, self.start)  # pins the mapping
        self.host_addr = ctypes.addressof(self._anchor)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def holds(self, gpa: int, length: int) -> bool:
        """Whether [gpa, gpa + length) lies inside this region."""
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    @property
    def num_pages(self) -> int:
        return self.size // PAGE_SIZE

    def close(self) -> None:
        self._anchor = None
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            log.warning("guest memory at %#x still has live views; unmapped when they die",
                        self.gpa)


class GuestMemory:
    """All guest RAM: a sorted set of non-overlapping page-aligned regions."""

    def __init__(self, regions: list[tuple[int, int]], *, backing_file: str | None = None,
                 first_slot: int = 0) -> None:
        layout = _check_layout(regions)
        self.backing_file = backing_file
        self.regions: list[MemoryRegion] = []
        try:
            self._map_all(layout, backing_file, first_slot)
        except BaseException:
            self.close()
            raise
        self._starts = [r.gpa for r in self.regions]
        self.size = sum(r.size for r in self.regions)

    def _map_all(self, layout: list[tuple[int, int]], backing_file: str | None,
                 first_slot: int) -> None:
        fd = _open_backing(backing_file, sum(size for _, size in layout))
        try:
            offset = 0
            for index, (gpa, size) in enumerate(layout):
                if fd >= 0:
                    mapping, start = _map_file(fd, size, offset), 0
                    file_offset = offset
                else:
                    (mapping, start), file_offset = _map_anonymous(size), None
                self.regions.append(MemoryRegion(gpa, size, first_slot + index, mapping,
                                                 file_offset=file_offset, start=start))
                offset += size
        finally:
            if fd >= 0:
                os.close(fd)

    # --- address translation
    def find_region(self, gpa: int) -> MemoryRegion:
        """The region containing ``gpa``; GuestMemoryError if none."""
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0:
            region = self.regions[index]
            if gpa < region.end:
                return region
        raise GuestMemoryError(f"guest address {gpa:#x} is not in guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if not isinstance(gpa, int) or not isinstance(length, int) or length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa!r}+{length!r}")
        region = self.find_region(gpa)
        offset = gpa - region.gpa
        if offset + length > region.size:
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} runs past RAM region end {region.end:#x}")
        return region, offset

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy writable view of guest RAM [gpa, gpa+length)."""
        region, offset = self._locate(gpa, length)
        return region.view[offset:offset + length]

    def host_address(self, gpa: int, length: int = 1) -> int:
        region, offset = self._locate(gpa, length)
        return region.host_addr + offset

    # --- byte and integer access
    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        self.view(gpa, data.nbytes)[:] = data

    def _unpack(self, code: str, gpa: int) -> int:
        size = _INT_SIZES[code]
        region, offset = self._locate(gpa, size)
        return region.view[offset:offset + size].cast(code)[0]

    def _pack(self, code: str, gpa: int, value: int) -> None:
        """One store of the whole integer: a vCPU reading it at the same time sees the old
        value or the new one (struct.pack_into would zero it first, then write bytes)."""
        size = _INT_SIZES[code]
        region, offset = self._locate(gpa, size)
        region.view[offset:offset + size].cast(code)[0] = value

    def read_u8(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 1)
        return region.view[offset]

    def write_u8(self, gpa: int, value: int) -> None:
        region, offset = self._locate(gpa, 1)
        region.view[offset] = value

    def read_u16(self, gpa: int) -> int:
        return self._unpack(_U16, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._unpack(_U32, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._unpack(_U64, gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._pack(_U16, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._pack(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._pack(_U64, gpa, value)

    # --- KVM registration and dirty tracking
    def register(self, vm: Any, *, track_dirty: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION for every region."""
        self.set_dirty_tracking(vm, track_dirty)

    def set_dirty_tracking(self, vm: Any, enabled: bool) -> None:
        """(Re-)register every region with or without KVM_MEM_LOG_DIRTY_PAGES."""
        flags = KVM_MEM_LOG_DIRTY_PAGES if enabled else 0
        for region in self.regions:
            vm.set_user_memory_region(region.slot, region.gpa, region.size,
                                      region.host_addr, flags)
            region.flags = flags

    def dirty_bitmaps(self, vm: Any) -> dict[int, bytes]:
        """KVM_GET_DIRTY_LOG for each region: {slot: bitmap}; reading clears it."""
        return {r.slot: vm.get_dirty_log(r.slot, r.num_pages) for r in self.regions}

    def dirty_pages(self, vm: Any) -> list[int]:
        """Guest physical addresses of pages written since the last call."""
        pages: list[int] = []
        for region in self.regions:
            bitmap = vm.get_dirty_log(region.slot, region.num_pages)
            pages.extend(region.gpa + n * PAGE_SIZE
                         for n in _set_bits(bitmap, region.num_pages))
        return pages

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
        self._starts = []

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_layout(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (gpa, size) pairs; ConfigError if misaligned, empty or overlapping."""
    layout = sorted((int(gpa), int(size)) for gpa, size in regions)
    if not layout:
        raise ConfigError("guest memory needs at least one region")
    for gpa, size in layout:
        if size <= 0 or gpa < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise ConfigError(f"memory region {gpa:#x}+{size:#x} is not page aligned and non-empty")
    for (gpa, size), (next_gpa, _) in zip(layout, layout[1:], strict=False):
        if gpa + size > next_gpa:
            raise ConfigError(f"memory regions overlap at {next_gpa:#x}")
    return layout


def _open_backing(path: str | None, total: int) -> int:
    if path is None:
        return -1
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size < total:
        os.ftruncate(fd, total)
    return fd


def _map_file(fd: int, size: int, offset: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)


def _map_anonymous(size: int) -> tuple[mmap.mmap, int]:
    """Private RAM, and the offset in it where a huge-page-aligned ``size`` bytes start.

    Transparent huge pages let KVM map guest RAM with 2 MiB pages: far fewer
    page faults and shallower nested page walks (QEMU does the same). They need
    2 MiB-aligned virtual addresses, so regions that large get padded mappings.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if size < HUGE_PAGE_SIZE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return mmap.mmap(-1, size, flags=flags, prot=prot), 0
    mapping = mmap.mmap(-1, size + HUGE_PAGE_SIZE, flags=flags, prot=prot)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % HUGE_PAGE_SIZE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, size - size % HUGE_PAGE_SIZE)
    except OSError as exc:  # THP disabled or unsupported: 4 KiB pages still work
        log.debug("guest RAM: madvise(MADV_HUGEPAGE) failed: %s", exc.strerror)
    return mapping, start


def _set_bits(bitmap: bytes, limit: int):
    """Indices of set bits (little-endian bit order, as KVM writes longs)."""
    for byte_index, byte in enumerate(bitmap):
        if not byte:
            continue
        base = byte_index * _BITS_PER_BYTE
        for bit in range(_BITS_PER_BYTE):
            if byte >> bit & 1 and base + bit < limit:
                yield base + bit
