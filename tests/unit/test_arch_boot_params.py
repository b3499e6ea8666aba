"""The zero page, field by field against bootparam.h / zero-page.rst / boot.rst."""

from __future__ import annotations

import ctypes
import struct

import pytest

from ember.arch.x86_64 import layout
from ember.arch.x86_64.boot_params import (BootParams, SetupHeader, build_boot_params,
                                           write_boot_params)
from ember.arch.x86_64.kernel import LoadedKernel
from ember.errors import ConfigError
from ember.memory import GuestMemory

from test_arch_images import bzimage

MEM_SIZE = 128 * layout.MiB
ELF_KERNEL = LoadedKernel("elf", 0x100_0000, 0x100_0000, 0x200_0000, None, 0x7FFF_FFFF, 2047)
BZ_HEADER = bzimage()[0x1F1:0x26C]
BZ_KERNEL = LoadedKernel("bzimage", 0x100200, 0x100000, 0x120_0000, BZ_HEADER, 0x7FFF_FFFF, 2047)


def u8(b, off): return b[off]
def u16(b, off): return struct.unpack_from("<H", b, off)[0]
def u32(b, off): return struct.unpack_from("<I", b, off)[0]
def u64(b, off): return struct.unpack_from("<Q", b, off)[0]


@pytest.mark.parametrize("field, offset", [
    ("acpi_rsdp_addr", 0x070), ("ext_ramdisk_image", 0x0C0), ("ext_ramdisk_size", 0x0C4),
    ("ext_cmd_line_ptr", 0x0C8), ("e820_entries", 0x1E8), ("sentinel", 0x1EF),
    ("hdr", 0x1F1), ("edd_mbr_sig_buffer", 0x290), ("e820_table", 0x2D0),
])
def test_boot_params_offsets(field, offset) -> None:
    assert getattr(BootParams, field).offset == offset
    assert ctypes.sizeof(BootParams) == 0x1000


@pytest.mark.parametrize("field, offset", [
    ("setup_sects", 0x1F1), ("boot_flag", 0x1FE), ("header", 0x202), ("version", 0x206),
    ("type_of_loader", 0x210), ("loadflags", 0x211), ("code32_start", 0x214),
    ("ramdisk_image", 0x218), ("ramdisk_size", 0x21C), ("cmd_line_ptr", 0x228),
    ("initrd_addr_max", 0x22C), ("kernel_alignment", 0x230), ("xloadflags", 0x236),
    ("cmdline_size", 0x238), ("pref_address", 0x258), ("init_size", 0x260),
    ("kernel_info_offset", 0x268),
])
def test_setup_header_offsets(field, offset) -> None:
    assert 0x1F1 + getattr(SetupHeader, field).offset == offset
    assert 0x1F1 + ctypes.sizeof(SetupHeader) == 0x26C


def test_elf_zero_page_builds_a_header() -> None:
    page = build_boot_params(ELF_KERNEL, "console=ttyS0", (0x400_0000, 0x12345), MEM_SIZE)
    assert len(page) == 0x1000
    assert u16(page, 0x1FE) == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert u16(page, 0x206) >= 0x020C
    assert u8(page, 0x210) == 0xFF  # type_of_loader: undefined
    assert u8(page, 0x211) & 1  # LOADED_HIGH
    assert u32(page, 0x228) == layout.CMDLINE_START
    assert u32(page, 0x238) == 2047
    assert u32(page, 0x218) == 0x400_0000
    assert u32(page, 0x21C) == 0x12345
    assert u32(page, 0x0C0) == u32(page, 0x0C4) == u32(page, 0x0C8) == 0
    assert u8(page, 0x1EF) == 0  # sentinel: we hand over a clean buffer


def test_bzimage_zero_page_copies_then_patches_the_header() -> None:
    page = build_boot_params(BZ_KERNEL, "quiet", None, MEM_SIZE)
    patched = {0x210, 0x228, 0x229, 0x22A, 0x22B}  # type_of_loader, cmd_line_ptr
    for offset in range(0x1F1, 0x26C):
        if offset not in patched:
            assert page[offset] == BZ_HEADER[offset - 0x1F1], hex(offset)
    assert u8(page, 0x210) == 0xFF
    assert u32(page, 0x228) == layout.CMDLINE_START
    assert u32(page, 0x218) == u32(page, 0x21C) == 0  # no initrd


def test_e820_table_in_zero_page() -> None:
    page = build_boot_params(ELF_KERNEL, "", None, 5 * layout.GiB)
    count = u8(page, 0x1E8)
    entries = [(u64(page, 0x2D0 + 20 * i), u64(page, 0x2D8 + 20 * i), u32(page, 0x2E0 + 20 * i))
               for i in range(count)]
    assert entries == [tuple(e) for e in layout.e820_map(5 * layout.GiB)]
    assert u64(page, 0x2D0 + 20 * count) == 0


def test_high_initrd_uses_ext_fields() -> None:
    page = build_boot_params(ELF_KERNEL, "", (0x1_2345_6000, 0x1_0000_0010), MEM_SIZE)
    assert u32(page, 0x218) == 0x2345_6000 and u32(page, 0x0C0) == 1
    assert u32(page, 0x21C) == 0x10 and u32(page, 0x0C4) == 1


def test_cmdline_too_long_names_the_limit() -> None:
    with pytest.raises(ConfigError, match="at most 2047"):
        build_boot_params(ELF_KERNEL, "x" * 2048, None, MEM_SIZE)
    build_boot_params(ELF_KERNEL, "x" * 2047, None, MEM_SIZE)


def test_cmdline_with_nul_rejected() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        build_boot_params(ELF_KERNEL, "a\0b", None, MEM_SIZE)


def test_write_boot_params_puts_cmdline_and_zero_page_in_memory() -> None:
    with GuestMemory(layout.ram_regions(MEM_SIZE)) as memory:
        zero_page = write_boot_params(memory, ELF_KERNEL, "console=ttyS0 reboot=k", None, MEM_SIZE)
        assert zero_page == layout.ZERO_PAGE_START
        assert memory.read(layout.CMDLINE_START, 23) == b"console=ttyS0 reboot=k\0"
        assert memory.read(zero_page + 0x202, 4) == b"HdrS"
        assert memory.read_u32(zero_page + 0x228) == layout.CMDLINE_START
