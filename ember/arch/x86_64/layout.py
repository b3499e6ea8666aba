"""Guest physical memory map of an Ember x86-64 microVM.

Where the boot structures (GDT, IDT, page tables, zero page, command line,
MP table), the kernel and the MMIO devices live, and the e820 map handed to
the guest (Linux boot protocol, Documentation/arch/x86/zero-page.rst).
"""

from __future__ import annotations

from typing import NamedTuple

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_SIZE = 4 * KiB

# Boot structures in the first 1 MiB (all below the EBDA).
GDT_START = 0x500
GDT_MAX_SIZE = 0x40
IDT_START = 0x540
IDT_SIZE = 8
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000
PD_COUNT = 4  # four page directories of 2 MiB pages: identity map of 4 GiB
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 2048  # x86 COMMAND_LINE_SIZE, terminating NUL included

# Legacy BIOS area: the EBDA, VGA hole and ROM area are reserved in e820.
EBDA_START = 0x9FC00
MPTABLE_START = EBDA_START
HIMEM_START = 0x100000  # 1 MiB: the protected-mode kernel of a bzImage

# The 32-bit MMIO gap: RAM stops at 3 GiB and resumes at 4 GiB.
MMIO_GAP_START = 3 * GiB
MMIO_GAP_END = 4 * GiB
BOOT_TIMER_ADDR = 0xD000_0000
BOOT_TIMER_SIZE = 0x1000
VIRTIO_MMIO_START = 0xD000_1000
VIRTIO_MMIO_SIZE = 0x1000
IOAPIC_START = 0xFEC0_0000
LAPIC_START = 0xFEE0_0000
# Three pages KVM needs for the VMX real-mode TSS and identity map (as Firecracker).
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
KVM_TSS_ADDR = 0xFFFB_D000

# Interrupt lines: ISA IRQs 0-15, virtio-mmio devices from 5 upwards (as
# Firecracker) up to the last IOAPIC pin.
IOAPIC_PINS = 24
IRQ_MAX = IOAPIC_PINS - 1

E820_RAM = 1
E820_RESERVED = 2


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int


def low_ram_end(mem_size: int) -> int:
    """First gpa past the RAM below the MMIO gap."""
    return min(mem_size, MMIO_GAP_START)


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """RAM as (gpa, size) regions, split around the 32-bit MMIO gap."""
    if mem_size <= HIMEM_START:
        raise ValueError(f"guest memory of {mem_size} bytes is below the 1 MiB minimum")
    regions = [(0, low_ram_end(mem_size))]
    if mem_size > MMIO_GAP_START:
        regions.append((MMIO_GAP_END, mem_size - MMIO_GAP_START))
    return regions


def e820_map(mem_size: int) -> list[E820Entry]:
    """The e820 table: RAM, the reserved EBDA/BIOS area, RAM above 1 MiB and 4 GiB."""
    low_end = ram_regions(mem_size)[0][1]
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        E820Entry(HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ]
    if mem_size > MMIO_GAP_START:
        entries.append(E820Entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM))
    return entries


def virtio_mmio_window(index: int) -> tuple[int, int]:
    """(gpa, size) of the index-th virtio-mmio device window."""
    gpa = VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE
    if index < 0 or gpa + VIRTIO_MMIO_SIZE > IOAPIC_START:
        raise ValueError(f"no virtio-mmio window {index}")
    return gpa, VIRTIO_MMIO_SIZE


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment
