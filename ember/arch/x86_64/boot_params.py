"""The zero page (struct boot_params) and kernel command line.

Layout from arch/x86/include/uapi/asm/bootparam.h and
Documentation/arch/x86/zero-page.rst; field use per boot.rst ("The 64-bit boot
protocol", "Details of header fields").  Only the fields a microVM needs are
named; the rest stays zero as the protocol asks of a clean buffer.
"""

from __future__ import annotations

import ctypes
import logging

from ember.errors import ConfigError

from . import layout
from .kernel import LoadedKernel

log = logging.getLogger(__name__)

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

BOOT_PARAMS_SIZE = 0x1000
E820_MAX_ENTRIES_ZEROPAGE = 128
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
ELF_PROTOCOL_VERSION = 0x020F  # what an ELF vmlinux claims: 2.15
TYPE_OF_LOADER_UNDEFINED = 0xFF
LOADED_HIGH = 1 << 0
LOW_32_BITS = 0xFFFF_FFFF


class SetupHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", u8), ("root_flags", u16), ("syssize", u32), ("ram_size", u16),
        ("vid_mode", u16), ("root_dev", u16), ("boot_flag", u16), ("jump", u16),
        ("header", u32), ("version", u16), ("realmode_swtch", u32),
        ("start_sys_seg", u16), ("kernel_version", u16), ("type_of_loader", u8),
        ("loadflags", u8), ("setup_move_size", u16), ("code32_start", u32),
        ("ramdisk_image", u32), ("ramdisk_size", u32), ("bootsect_kludge", u32),
        ("heap_end_ptr", u16), ("ext_loader_ver", u8), ("ext_loader_type", u8),
        ("cmd_line_ptr", u32), ("initrd_addr_max", u32), ("kernel_alignment", u32),
        ("relocatable_kernel", u8), ("min_alignment", u8), ("xloadflags", u16),
        ("cmdline_size", u32), ("hardware_subarch", u32), ("hardware_subarch_data", u64),
        ("payload_offset", u32), ("payload_length", u32), ("setup_data", u64),
        ("pref_address", u64), ("init_size", u32), ("handover_offset", u32),
        ("kernel_info_offset", u32),
    ]


class BootE820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class BootParams(ctypes.LittleEndianStructure):
    """struct boot_params; padding names give the offsets of what they skip."""

    _pack_ = 1
    _fields_ = [
        ("_pad_000", u8 * 0x70),
        ("acpi_rsdp_addr", u64),  # 0x070
        ("_pad_078", u8 * 0x48),
        ("ext_ramdisk_image", u32),  # 0x0c0
        ("ext_ramdisk_size", u32),  # 0x0c4
        ("ext_cmd_line_ptr", u32),  # 0x0c8
        ("_pad_0cc", u8 * 0x11C),
        ("e820_entries", u8),  # 0x1e8
        ("eddbuf_entries", u8),
        ("edd_mbr_sig_buf_entries", u8),
        ("kbd_status", u8),
        ("secure_boot", u8),
        ("_pad5", u8 * 2),
        ("sentinel", u8),  # 0x1ef
        ("_pad6", u8),
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", u8 * (0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", u32 * 16),  # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad_cd0", u8 * (BOOT_PARAMS_SIZE - 0xCD0)),
    ]


def encode_cmdline(cmdline: str, kernel: LoadedKernel) -> bytes:
    """The NUL-terminated command line, or ConfigError naming the limit."""
    data = cmdline.encode()
    if b"\0" in data:
        raise ConfigError("kernel command line contains a NUL byte")
    if len(data) > kernel.cmdline_size:
        raise ConfigError(f"kernel command line is {len(data)} bytes; "
                          f"this kernel accepts at most {kernel.cmdline_size}")
    return data + b"\0"


def build_boot_params(kernel: LoadedKernel, cmdline: str, initrd: tuple[int, int] | None,
                      mem_size: int) -> bytes:
    """The 4 KiB zero page for ``kernel`` (the command line is checked, not written)."""
    encode_cmdline(cmdline, kernel)
    params = BootParams()
    _fill_header(params.hdr, kernel)
    _set_pointers(params, layout.CMDLINE_START, initrd)
    entries = layout.e820_map(mem_size)
    params.e820_entries = len(entries)
    for slot, entry in zip(params.e820_table, entries):
        slot.addr, slot.size, slot.type = entry
    return bytes(params)


def write_boot_params(memory, kernel: LoadedKernel, cmdline: str,
                      initrd: tuple[int, int] | None, mem_size: int) -> int:
    """Write the command line and zero page into guest memory; returns the zero page gpa."""
    params = build_boot_params(kernel, cmdline, initrd, mem_size)
    memory.write(layout.CMDLINE_START, encode_cmdline(cmdline, kernel))
    memory.write(layout.ZERO_PAGE_START, params)
    log.debug("boot params at %#x, cmdline %r", layout.ZERO_PAGE_START, cmdline)
    return layout.ZERO_PAGE_START


def _fill_header(hdr: SetupHeader, kernel: LoadedKernel) -> None:
    if kernel.setup_header is not None:
        raw = kernel.setup_header[:ctypes.sizeof(SetupHeader)]
        ctypes.memmove(ctypes.addressof(hdr), raw, len(raw))
    else:
        hdr.boot_flag = BOOT_FLAG
        hdr.header = HDRS_MAGIC
        hdr.version = ELF_PROTOCOL_VERSION
        hdr.kernel_alignment = kernel.kernel_alignment
        hdr.initrd_addr_max = kernel.initrd_addr_max
        hdr.cmdline_size = kernel.cmdline_size
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags |= LOADED_HIGH


def _set_pointers(params: BootParams, cmdline_gpa: int, initrd: tuple[int, int] | None) -> None:
    """Command line and initrd addresses, split into low and ext_ high 32 bits."""
    params.hdr.cmd_line_ptr = cmdline_gpa & LOW_32_BITS
    params.ext_cmd_line_ptr = cmdline_gpa >> 32
    if initrd is not None:
        gpa, size = initrd
        params.hdr.ramdisk_image = gpa & LOW_32_BITS
        params.ext_ramdisk_image = gpa >> 32
        params.hdr.ramdisk_size = size & LOW_32_BITS
        params.ext_ramdisk_size = size >> 32
