"""Tiny 64-bit "kernels" for testing the machine without Linux.

Each is an ELF64 executable with one PT_LOAD segment whose code starts at the
entry point in long mode (as the 64-bit boot protocol hands over): it talks
to Ember's devices with port and MMIO writes, then asks for a reset.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100_0000  # 16 MiB, inside the smallest guest RAM
COM1 = 0x3F8
BOOT_TIMER = 0xD000_0000
BOOT_COMPLETE_MAGIC = 123


def serial_write(text: bytes) -> bytes:
    code = b"\x66\xba" + struct.pack("<H", COM1)          # mov dx, COM1
    for byte in text:
        code += b"\xb0" + bytes([byte]) + b"\xee"          # mov al, byte; out dx, al
    return code


def boot_complete() -> bytes:
    return (b"\xb8" + struct.pack("<I", BOOT_TIMER)       # mov eax, BOOT_TIMER
            + b"\xc6\x00" + bytes([BOOT_COMPLETE_MAGIC]))  # mov byte [rax], 123


def exit_status(status: int) -> bytes:
    return (b"\xb8" + struct.pack("<I", BOOT_TIMER)       # mov eax, BOOT_TIMER
            + b"\xc7\x40\x10" + struct.pack("<I", status))  # mov dword [rax+0x10], status


def i8042_reset() -> bytes:
    return b"\xb0\xfe\xe6\x64"                             # mov al, 0xfe; out 0x64, al


def triple_fault() -> bytes:
    # lidt with a zero limit, then int3: no IDT, so #DF, then shutdown.
    return b"\x6a\x00\x6a\x00\x0f\x01\x1c\x24\xcc"         # push 0; push 0; lidt [rsp]; int3


def halt_forever() -> bytes:
    return b"\xf4\xeb\xfd"                                 # hlt; jmp back to hlt


def elf64(code: bytes, load_addr: int = LOAD_ADDR) -> bytes:
    """A minimal ELF64 x86-64 executable with one PT_LOAD segment at load_addr."""
    ehsize, phsize = 64, 56
    offset = 0x1000
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, load_addr, ehsize, 0, 0,
                          ehsize, phsize, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, load_addr, load_addr, len(code), len(code), 0x1000)
    image = header + phdr
    return image + bytes(offset - len(image)) + code


def print_virtio_identity(window: int) -> bytes:
    """Print a virtio-mmio window's MagicValue (4 characters) and its DeviceID as a digit:
    every register access is a guest load."""
    code = b"\xbe" + struct.pack("<I", window)             # mov esi, window
    code += b"\x66\xba" + struct.pack("<H", COM1)          # mov dx, COM1
    code += b"\x8b\x1e"                                     # mov ebx, [rsi]: MagicValue
    for _ in range(4):
        code += b"\x88\xd8\xee\xc1\xeb\x08"            # mov al, bl; out dx, al; shr ebx, 8
    code += b"\x8b\x5e\x08"                                # mov ebx, [rsi+8]: DeviceID
    code += b"\x88\xd8\x04\x30\xee"                      # mov al, bl; add al, '0'; out dx, al
    return code


def load_interrupt_status(window: int, loads: int) -> bytes:
    """Load a virtio-mmio window's InterruptStatus ``loads`` times."""
    return (b"\xbe" + struct.pack("<I", window)             # mov esi, window
            + b"\x8b\x46\x60" * loads)                     # mov eax, [rsi+0x60]
