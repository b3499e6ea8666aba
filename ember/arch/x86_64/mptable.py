"""The MP table: how a guest without ACPI finds its CPUs and IOAPIC.

Intel MultiProcessor Specification 1.4, chapter 4: an MP floating pointer
structure (4.1) pointing at an MP configuration table (4.2) with processor,
bus, I/O APIC, I/O interrupt and local interrupt entries (4.3).  Placed in the
EBDA, which the e820 map reserves; Linux finds it by scanning 639-640 KiB.
"""

from __future__ import annotations

import logging
import struct

from ember.errors import ConfigError

from . import layout

log = logging.getLogger(__name__)

MAX_VCPUS = 254  # APIC ids 0..253, the IOAPIC takes the next id; 255 is broadcast
SPEC_REVISION = 4  # MP spec 1.4
FLOATING_SIGNATURE = b"_MP_"
CONFIG_SIGNATURE = b"PCMP"
OEM_ID = b"EMBER   "
PRODUCT_ID = b"MICROVM     "

FLOATING = struct.Struct("<4sIBBB5s")  # signature, table ptr, length/16, rev, checksum, features
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
PROCESSOR = struct.Struct("<BBBBII8s")
BUS = struct.Struct("<BB6s")
IOAPIC = struct.Struct("<BBBBI")
INTERRUPT = struct.Struct("<BBHBBBB")  # I/O and local interrupt entries share a layout

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 1 << 0
CPU_BOOTSTRAP = 1 << 1
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, on-chip APIC
IOAPIC_ENABLED = 1
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = range(4)
INT_FLAGS_CONFORMING = 0  # polarity and trigger conform to the bus
ALL_LOCAL_APICS = 0xFF
MPTABLE_LIMIT = layout.HIMEM_START  # the reserved EBDA/BIOS area ends at 1 MiB


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return -sum(data) & 0xFF


def build_mptable(vcpu_count: int, base: int = layout.MPTABLE_START) -> bytes:
    """Floating pointer followed by the configuration table, for gpa ``base``."""
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise ConfigError(f"the MP table describes 1 to {MAX_VCPUS} vCPUs, not {vcpu_count}")
    entries = _entries(vcpu_count)
    body = b"".join(entries)
    length = CONFIG_HEADER.size + len(body)
    header = CONFIG_HEADER.pack(CONFIG_SIGNATURE, length, SPEC_REVISION, 0, OEM_ID,
                                PRODUCT_ID, 0, 0, len(entries), layout.LAPIC_START, 0, 0, 0)
    config = bytearray(header + body)
    config[7] = checksum(config)  # checksum byte of the configuration header
    table_gpa = base + FLOATING.size
    floating = bytearray(FLOATING.pack(FLOATING_SIGNATURE, table_gpa, 1, SPEC_REVISION, 0, bytes(5)))
    floating[10] = checksum(floating)
    return bytes(floating + config)


def write_mptable(memory, vcpu_count: int) -> int:
    """Write the MP table into the EBDA; returns its size in bytes."""
    table = build_mptable(vcpu_count)
    if layout.MPTABLE_START + len(table) > MPTABLE_LIMIT:
        raise ConfigError(f"MP table for {vcpu_count} vCPUs overflows the EBDA area")
    memory.write(layout.MPTABLE_START, table)
    log.debug("MP table at %#x: %d vCPUs, %d bytes", layout.MPTABLE_START, vcpu_count, len(table))
    return len(table)


def _entries(vcpu_count: int) -> list[bytes]:
    ioapic_id = vcpu_count
    entries = [PROCESSOR.pack(ENTRY_PROCESSOR, cpu, LAPIC_VERSION,
                              CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0),
                              CPU_SIGNATURE, CPU_FEATURES, bytes(8))
               for cpu in range(vcpu_count)]
    entries.append(BUS.pack(ENTRY_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED,
                               layout.IOAPIC_START))
    entries += [INTERRUPT.pack(ENTRY_IO_INTERRUPT, INT_TYPE_INT, INT_FLAGS_CONFORMING,
                               ISA_BUS_ID, irq, ioapic_id, irq)
                for irq in range(layout.IRQ_MAX + 1)]
    entries.append(INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, INT_FLAGS_CONFORMING,
                                  ISA_BUS_ID, 0, ALL_LOCAL_APICS, 0))
    entries.append(INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, INT_FLAGS_CONFORMING,
                                  ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1))
    return entries
