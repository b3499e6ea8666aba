"""Synthetic kernel images for the x86-64 loader tests (built with struct)."""

from __future__ import annotations

import struct

ELF_LOAD_ADDR = 0x100_0000  # 16 MiB, where a real vmlinux puts startup_64
ELF_PAYLOAD = bytes(range(256)) * 16  # 4 KiB of recognisable bytes
ELF_BSS = 0x3000

BZ_SETUP_SECTS = 1
BZ_PAYLOAD = b"\x90" * 0x200 + b"STARTUP64" + bytes(0x1000 - 0x209)
BZ_PREF_ADDRESS = 0x100_0000
BZ_INIT_SIZE = 0x20_0000
BZ_ALIGNMENT = 0x20_0000
BZ_INITRD_ADDR_MAX = 0x7FFF_FFFF
BZ_CMDLINE_SIZE = 0x7FF


def elf_image(*, elf_class: int = 2, machine: int = 62, paddr: int = ELF_LOAD_ADDR,
              entry: int | None = None, payload: bytes = ELF_PAYLOAD, bss: int = ELF_BSS,
              empty_segment: bool = False) -> bytes:
    """An ELF64 executable with one PT_LOAD segment at ``paddr`` (plus an empty one)."""
    phoff, ehsize, phentsize = 64, 64, 56
    data_offset = 0x1000
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1,
                         paddr if entry is None else entry, phoff, 0, 0,
                         ehsize, phentsize, 2 if empty_segment else 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, data_offset, (0xFFFF_FFFF_8000_0000 + paddr) & 0xFFFF_FFFF_FFFF_FFFF, paddr,
                       len(payload), len(payload) + bss, 0x20_0000)
    if empty_segment:
        phdr += struct.pack("<IIQQQQQQ", 1, 6, data_offset, 0, 0, 0, 0, 0x1000)
    image = header + phdr
    return image + bytes(data_offset - len(image)) + payload


def bzimage(*, version: int = 0x020F, xloadflags: int = 1, loadflags: int = 1,
            boot_flag: int = 0xAA55, magic: bytes = b"HdrS", setup_sects: int = BZ_SETUP_SECTS,
            payload: bytes = BZ_PAYLOAD, init_size: int = BZ_INIT_SIZE) -> bytes:
    """A bzImage: boot sector + setup header, then the protected-mode kernel."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes([0xEB, 0x26C - 0x202])  # jmp over the header
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x10_0000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, BZ_INITRD_ADDR_MAX)
    struct.pack_into("<I", setup, 0x230, BZ_ALIGNMENT)
    setup[0x234] = 1  # relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, BZ_CMDLINE_SIZE)
    struct.pack_into("<Q", setup, 0x258, BZ_PREF_ADDRESS)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def test_builders_make_what_the_loaders_detect() -> None:
    assert elf_image()[:4] == b"\x7fELF"
    image = bzimage()
    assert image[0x202:0x206] == b"HdrS"
    assert len(image) == (BZ_SETUP_SECTS + 1) * 512 + len(BZ_PAYLOAD)
