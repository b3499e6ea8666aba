"""Initrd placement: page-aligned, as high as allowed, above the kernel (boot.rst)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.arch.x86_64 import layout
from ember.arch.x86_64.initrd import InitrdError, load_initrd, place_initrd
from ember.arch.x86_64.kernel import LoadedKernel
from ember.memory import GuestMemory

MiB = layout.MiB
KERNEL = LoadedKernel("elf", 0x100_0000, 0x100_0000, 0x200_0000, None, 0x7FFF_FFFF, 2047)


def test_placed_at_top_of_low_ram() -> None:
    gpa = place_initrd(KERNEL, 3 * MiB + 100, 64 * MiB)
    assert gpa % layout.PAGE_SIZE == 0
    assert gpa + 3 * MiB + 100 <= 64 * MiB
    assert 64 * MiB - (gpa + 3 * MiB + 100) < layout.PAGE_SIZE


def test_respects_initrd_addr_max() -> None:
    gpa = place_initrd(KERNEL, MiB, 4 * layout.GiB)
    assert gpa + MiB <= 0x8000_0000


def test_below_the_mmio_gap_without_addr_max() -> None:
    kernel = LoadedKernel("elf", 0x100_0000, 0x100_0000, 0x200_0000, None, 0xFFFF_FFFF_FF, 2047)
    gpa = place_initrd(kernel, MiB, 8 * layout.GiB)
    assert gpa + MiB <= layout.MMIO_GAP_START


def test_not_enough_memory_names_what_is_needed() -> None:
    with pytest.raises(InitrdError, match=r"not enough guest memory for kernel and initrd \(need 63 MiB\)"):
        place_initrd(KERNEL, 31 * MiB, 48 * MiB)


@given(st.integers(1, 200 * MiB), st.integers(16, 256).map(lambda m: m * MiB))
def test_never_overlaps_the_kernel_or_leaves_ram(size, mem_size) -> None:
    try:
        gpa = place_initrd(KERNEL, size, mem_size)
    except InitrdError:
        assert KERNEL.load_end + size > mem_size - layout.PAGE_SIZE
        return
    assert gpa >= KERNEL.load_end and gpa % layout.PAGE_SIZE == 0
    assert gpa + size <= mem_size


def test_load_copies_the_file(tmp_path) -> None:
    data = bytes(range(256)) * 1000
    path = tmp_path / "initrd"
    path.write_bytes(data)
    with GuestMemory(layout.ram_regions(64 * MiB)) as memory:
        gpa, size = load_initrd(memory, path, KERNEL, 64 * MiB)
        assert size == len(data)
        assert memory.read(gpa, size) == data


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b""), "is empty"),
])
def test_load_errors(tmp_path, make, message) -> None:
    path = tmp_path / "initrd"
    make(path)
    with GuestMemory(layout.ram_regions(64 * MiB)) as memory:
        with pytest.raises(InitrdError, match=message):
            load_initrd(memory, path, KERNEL, 64 * MiB)
