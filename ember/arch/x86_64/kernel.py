"""Guest kernel loader: ELF vmlinux or bzImage into guest RAM.

Follows the Linux x86 boot protocol (Documentation/arch/x86/boot.rst, "The
64-bit boot protocol"; setup_header in arch/x86/include/uapi/asm/bootparam.h)
and the ELF-64 object file format for vmlinux.  The kernel file is untrusted:
every offset and size is checked against the file and guest RAM.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Literal

from ember.errors import EmberError

from . import layout

log = logging.getLogger(__name__)

# ELF-64 (System V gABI).
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF_PHDR = struct.Struct("<IIQQQQQQ")
ELF_MAX_PHNUM = 256
HEAD_SIZE = 0x1000  # enough for the ELF header or the bzImage setup header

# bzImage setup header (offsets in the file, boot.rst "The real-mode kernel header").
SETUP_SECTS_OFFSET = 0x1F1
BOOT_FLAG_OFFSET = 0x1FE
JUMP_OFFSET = 0x200
HEADER_OFFSET = 0x202
VERSION_OFFSET = 0x206
LOADFLAGS_OFFSET = 0x211
INITRD_ADDR_MAX_OFFSET = 0x22C
KERNEL_ALIGNMENT_OFFSET = 0x230
RELOCATABLE_OFFSET = 0x234
XLOADFLAGS_OFFSET = 0x236
CMDLINE_SIZE_OFFSET = 0x238
PREF_ADDRESS_OFFSET = 0x258
INIT_SIZE_OFFSET = 0x260
SETUP_HEADER_END = 0x26C  # end of struct setup_header as of protocol 2.15
BOOT_PARAMS_HDR_LIMIT = 0x290  # boot_params has room for the header up to here
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, which says whether the 64-bit entry exists
LOADED_HIGH = 1 << 0
XLF_KERNEL_64 = 1 << 0
STARTUP_64_OFFSET = 0x200  # boot.rst: 64-bit entry is 0x200 past the protected-mode kernel

# Defaults for an ELF vmlinux, which carries no setup header.
ELF_INITRD_ADDR_MAX = 0x7FFF_FFFF
ELF_KERNEL_ALIGNMENT = 0x0100_0000


class KernelImageError(EmberError):
    """The guest kernel image cannot be loaded; the message names why."""


@dataclass(frozen=True)
class LoadedKernel:
    kind: Literal["elf", "bzimage"]
    entry: int  # gpa of the 64-bit entry point
    load_start: int  # gpa range the kernel uses, decompression included
    load_end: int
    setup_header: bytes | None  # bzImage: header bytes for boot_params at 0x1f1
    initrd_addr_max: int
    cmdline_size: int  # longest command line the kernel accepts, NUL excluded
    kernel_alignment: int = ELF_KERNEL_ALIGNMENT


def load_kernel(memory, path: str | os.PathLike) -> LoadedKernel:
    """Load the kernel at ``path`` into guest memory; detect ELF or bzImage."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise KernelImageError(f"kernel image {path} does not exist") from None
    except OSError as e:
        raise KernelImageError(f"cannot open kernel image {path}: {e.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        head = _pread(f, 0, min(file_size, HEAD_SIZE))
        if not head:
            raise KernelImageError(f"kernel image {path} is empty")
        if head.startswith(ELF_MAGIC):
            kernel = _load_elf(memory, f, file_size, head, path)
        elif _looks_like_bzimage(head):
            kernel = _load_bzimage(memory, f, file_size, head, path)
        else:
            raise KernelImageError(f"kernel image {path} is neither an ELF vmlinux nor a bzImage")
    log.info("loaded %s kernel %s at %#x-%#x, entry %#x",
             kernel.kind, path, kernel.load_start, kernel.load_end, kernel.entry)
    return kernel


def _pread(f: BinaryIO, offset: int, length: int) -> bytes:
    return os.pread(f.fileno(), length, offset)


def _read_into(memory, f: BinaryIO, offset: int, gpa: int, length: int, path) -> None:
    """Copy file bytes straight into guest memory; a short read is truncation."""
    if length == 0:
        return
    view = memory.view(gpa, length)
    done = 0
    while done < length:
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise KernelImageError(f"kernel image {path} is truncated")
        done += n


def _check_fits(memory, start: int, end: int, path, what: str) -> None:
    """Kernel bytes must lie in RAM above 1 MiB and below the MMIO gap."""
    low_end = layout.low_ram_end(memory.size)
    if start < layout.HIMEM_START:
        raise KernelImageError(f"kernel image {path}: {what} at {start:#x} is below 1 MiB")
    if end > low_end:
        need = -(-end // layout.MiB)
        raise KernelImageError(
            f"kernel image {path} needs {need} MiB of guest memory "
            f"but only {low_end // layout.MiB} MiB are below the MMIO gap")


# ---- ELF vmlinux ----------------------------------------------------------

def _load_elf(memory, f, file_size: int, head: bytes, path) -> LoadedKernel:
    if len(head) < ELF_HEADER.size:
        raise KernelImageError(f"kernel image {path} is a truncated ELF file")
    (ident, _type, machine, _ver, entry, phoff, _shoff, _flags,
     _ehsize, phentsize, phnum, *_rest) = ELF_HEADER.unpack_from(head)
    if ident[4] != ELFCLASS64:
        raise KernelImageError(f"kernel image {path} is a 32-bit ELF; a 64-bit vmlinux is needed")
    if ident[5] != ELFDATA2LSB:
        raise KernelImageError(f"kernel image {path} is a big-endian ELF")
    if machine != EM_X86_64:
        raise KernelImageError(f"kernel image {path} is an ELF for machine {machine}, not x86-64")
    if phentsize != ELF_PHDR.size or not 0 < phnum <= ELF_MAX_PHNUM:
        raise KernelImageError(f"kernel image {path} has a corrupt ELF program header table")
    if phoff + phnum * phentsize > file_size:
        raise KernelImageError(f"kernel image {path} is truncated (program headers)")
    table = _pread(f, phoff, phnum * phentsize)
    if len(table) != phnum * phentsize:
        raise KernelImageError(f"kernel image {path} is truncated (program headers)")
    segments = [s for s in ELF_PHDR.iter_unpack(table) if s[0] == PT_LOAD and s[6] > 0]
    if not segments:
        raise KernelImageError(f"kernel image {path} has no loadable segment")
    start, end = _load_segments(memory, f, file_size, segments, path)
    if not start <= entry < end:
        raise KernelImageError(f"kernel image {path}: entry {entry:#x} is outside its segments")
    return LoadedKernel("elf", entry, start, end, None, ELF_INITRD_ADDR_MAX,
                        layout.CMDLINE_MAX_SIZE - 1)


def _load_segments(memory, f, file_size: int, segments, path) -> tuple[int, int]:
    """Check every PT_LOAD segment first, then copy them; returns the gpa span."""
    for _t, _fl, offset, _va, paddr, filesz, memsz, _al in segments:
        if filesz > memsz:
            raise KernelImageError(f"kernel image {path} has a segment larger in file than in memory")
        if offset + filesz > file_size:
            raise KernelImageError(f"kernel image {path} is truncated (segment at offset {offset:#x})")
        _check_fits(memory, paddr, paddr + memsz, path, "segment")
    for _t, _fl, offset, _va, paddr, filesz, memsz, _al in segments:
        _read_into(memory, f, offset, paddr, filesz, path)
        if memsz > filesz:
            memory.view(paddr + filesz, memsz - filesz)[:] = bytes(memsz - filesz)
    start = min(s[4] for s in segments)
    end = max(s[4] + s[6] for s in segments)
    return start, end


# ---- bzImage --------------------------------------------------------------

def _looks_like_bzimage(head: bytes) -> bool:
    return (len(head) >= HEADER_OFFSET + 4
            and head[HEADER_OFFSET:HEADER_OFFSET + 4] == HDRS_MAGIC)


def _u(head: bytes, fmt: str, offset: int) -> int:
    return struct.unpack_from("<" + fmt, head, offset)[0]


def _load_bzimage(memory, f, file_size: int, head: bytes, path) -> LoadedKernel:
    if len(head) < SETUP_HEADER_END:
        raise KernelImageError(f"kernel image {path} is a truncated bzImage")
    _check_bzimage_header(head, path)
    setup_sects = head[SETUP_SECTS_OFFSET] or DEFAULT_SETUP_SECTS
    payload_offset = (setup_sects + 1) * SECTOR_SIZE
    payload_size = file_size - payload_offset
    if payload_size <= 0:
        raise KernelImageError(f"kernel image {path} is truncated (no protected-mode kernel)")
    load_start = layout.HIMEM_START
    load_end = max(load_start + payload_size, _decompress_end(head, load_start))
    _check_fits(memory, load_start, load_end, path, "kernel")
    _read_into(memory, f, payload_offset, load_start, payload_size, path)
    header_end = min(HEADER_OFFSET + head[JUMP_OFFSET + 1], BOOT_PARAMS_HDR_LIMIT)
    header = head[SETUP_SECTS_OFFSET:max(header_end, SETUP_HEADER_END)]
    return LoadedKernel(
        "bzimage", load_start + STARTUP_64_OFFSET, load_start, load_end, header,
        _u(head, "I", INITRD_ADDR_MAX_OFFSET),
        min(_u(head, "I", CMDLINE_SIZE_OFFSET), layout.CMDLINE_MAX_SIZE - 1),
        _u(head, "I", KERNEL_ALIGNMENT_OFFSET) or ELF_KERNEL_ALIGNMENT)


def _check_bzimage_header(head: bytes, path) -> None:
    if _u(head, "H", BOOT_FLAG_OFFSET) != BOOT_FLAG:
        raise KernelImageError(f"kernel image {path} has no 0xAA55 boot flag")
    version = _u(head, "H", VERSION_OFFSET)
    if version < MIN_PROTOCOL:
        raise KernelImageError(
            f"kernel image {path} uses boot protocol {version >> 8}.{version & 0xff:02d}; "
            f"2.12 or later is needed for the 64-bit entry")
    if not head[LOADFLAGS_OFFSET] & LOADED_HIGH:
        raise KernelImageError(f"kernel image {path} is a zImage, not a bzImage")
    if not _u(head, "H", XLOADFLAGS_OFFSET) & XLF_KERNEL_64:
        raise KernelImageError(f"kernel image {path} has no 64-bit entry point (XLF_KERNEL_64)")


def _decompress_end(head: bytes, load_start: int) -> int:
    """End of the memory the decompressor uses: init_size from where it runs.

    A relocatable kernel runs at its load address aligned up to
    kernel_alignment, but never below pref_address (LOAD_PHYSICAL_ADDR).
    """
    alignment = _u(head, "I", KERNEL_ALIGNMENT_OFFSET) or 1
    if alignment & (alignment - 1):
        alignment = 1
    run_at = max(layout.align_up(load_start, alignment), _u(head, "Q", PREF_ADDRESS_OFFSET))
    return run_at + _u(head, "I", INIT_SIZE_OFFSET)
