"""The boot GDT and IDT for the 64-bit entry.

Linux boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"):
flat 4 GiB segments with __BOOT_CS = 0x10 (execute/read) and __BOOT_DS = 0x18
(read/write).  Descriptor encoding per Intel SDM vol. 3A section 3.4.5.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import layout

# Descriptor flags as (flags nibble << 12 | access byte), as Firecracker writes them.
CODE64_FLAGS = 0xA09B  # G, L; present, DPL 0, code, execute/read, accessed
DATA_FLAGS = 0xC093  # G, D/B; present, DPL 0, data, read/write, accessed
TSS_FLAGS = 0x808B  # G; present, DPL 0, system, 64-bit busy TSS
FLAT_LIMIT = 0xFFFFF

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
DESCRIPTOR_SIZE = 8


class Segment(NamedTuple):
    """A decoded descriptor, in the fields kvm_segment wants."""
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the KVM field name
    g: int
    avl: int
    unusable: int


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor."""
    return (((base & 0xFF00_0000) << (56 - 24))
            | ((flags & 0x0000_F0FF) << 40)
            | ((limit & 0x000F_0000) << (48 - 16))
            | ((base & 0x00FF_FFFF) << 16)
            | (limit & 0x0000_FFFF))


def boot_gdt() -> list[int]:
    """GDT entries indexed by selector / 8: null, null, code, data, TSS."""
    return [0, 0,
            gdt_entry(CODE64_FLAGS, 0, FLAT_LIMIT),
            gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT),
            gdt_entry(TSS_FLAGS, 0, FLAT_LIMIT)]


def decode(entry: int, selector: int) -> Segment:
    """The segment a descriptor describes, limit scaled by G (kvm_segment form)."""
    limit = ((entry >> 32) & 0x000F_0000) | (entry & 0xFFFF)
    g = (entry >> 55) & 1
    present = (entry >> 47) & 1
    return Segment(
        base=((entry >> 16) & 0x00FF_FFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector, type=(entry >> 40) & 0xF, present=present,
        dpl=(entry >> 45) & 3, db=(entry >> 54) & 1, s=(entry >> 44) & 1,
        l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1, unusable=0 if present else 1)


def write_gdt(memory) -> None:
    """Write the boot GDT and an empty IDT at their layout addresses."""
    table = boot_gdt()
    memory.write(layout.GDT_START, struct.pack(f"<{len(table)}Q", *table))
    memory.write(layout.IDT_START, bytes(layout.IDT_SIZE))


def gdt_limit() -> int:
    return len(boot_gdt()) * DESCRIPTOR_SIZE - 1
