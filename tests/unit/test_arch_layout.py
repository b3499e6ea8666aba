"""Guest memory map: RAM regions around the MMIO gap and the e820 table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.arch.x86_64 import layout
from ember.arch.x86_64.layout import E820_RAM, E820_RESERVED, GiB, MiB


def test_small_guest_is_one_region() -> None:
    assert layout.ram_regions(256 * MiB) == [(0, 256 * MiB)]


def test_large_guest_split_around_the_gap() -> None:
    assert layout.ram_regions(6 * GiB) == [(0, 3 * GiB), (4 * GiB, 3 * GiB)]


def test_exactly_three_gib_has_no_high_region() -> None:
    assert layout.ram_regions(3 * GiB) == [(0, 3 * GiB)]


def test_too_small() -> None:
    with pytest.raises(ValueError):
        layout.ram_regions(MiB)


def test_e820_small_guest() -> None:
    assert layout.e820_map(128 * MiB) == [
        (0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        (0x100000, 127 * MiB, E820_RAM),
    ]


def test_e820_large_guest_has_ram_above_4g() -> None:
    entries = layout.e820_map(5 * GiB)
    assert entries[-1] == (4 * GiB, 2 * GiB, E820_RAM)
    assert entries[2] == (MiB, 3 * GiB - MiB, E820_RAM)


@given(st.integers(2 * MiB, 64 * GiB).map(lambda n: n // layout.PAGE_SIZE * layout.PAGE_SIZE))
def test_e820_covers_all_ram_without_overlap_or_gap_use(mem_size: int) -> None:
    entries = sorted(layout.e820_map(mem_size))
    for a, b in zip(entries, entries[1:]):
        assert a.addr + a.size <= b.addr
    for e in entries:
        assert e.size > 0
        assert e.addr + e.size <= layout.MMIO_GAP_START or e.addr >= layout.MMIO_GAP_END
    ram = sum(e.size for e in entries if e.type == E820_RAM)
    reserved = sum(e.size for e in entries if e.type == E820_RESERVED)
    assert ram + reserved == mem_size
    covered = [(e.addr, e.addr + e.size) for e in entries]
    regions = [(gpa, gpa + size) for gpa, size in layout.ram_regions(mem_size)]
    assert _merge(covered) == regions


def _merge(spans):
    merged = []
    for start, end in sorted(spans):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def test_boot_structures_do_not_overlap_and_sit_below_the_ebda() -> None:
    spans = sorted([
        (layout.GDT_START, layout.GDT_START + layout.GDT_MAX_SIZE),
        (layout.IDT_START, layout.IDT_START + layout.IDT_SIZE),
        (layout.ZERO_PAGE_START, layout.ZERO_PAGE_START + layout.PAGE_SIZE),
        (layout.BOOT_STACK_POINTER - 0x800, layout.BOOT_STACK_POINTER),
        (layout.PML4_START, layout.PML4_START + layout.PAGE_SIZE),
        (layout.PDPT_START, layout.PDPT_START + layout.PAGE_SIZE),
        (layout.PD_START, layout.PD_START + layout.PD_COUNT * layout.PAGE_SIZE),
        (layout.CMDLINE_START, layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE),
    ])
    for a, b in zip(spans, spans[1:]):
        assert a[1] <= b[0], (a, b)
    assert spans[-1][1] <= layout.EBDA_START


def test_mmio_devices_live_in_the_gap() -> None:
    for addr in (layout.BOOT_TIMER_ADDR, layout.VIRTIO_MMIO_START, layout.IOAPIC_START,
                 layout.LAPIC_START, layout.KVM_TSS_ADDR, layout.KVM_IDENTITY_MAP_ADDR):
        assert layout.MMIO_GAP_START <= addr < layout.MMIO_GAP_END
    assert layout.BOOT_TIMER_ADDR + layout.BOOT_TIMER_SIZE <= layout.VIRTIO_MMIO_START
    assert layout.virtio_mmio_window(2) == (0xD000_3000, 0x1000)
    with pytest.raises(ValueError):
        layout.virtio_mmio_window(-1)
