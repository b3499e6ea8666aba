"""MP table (Intel MP spec 1.4 chapter 4): checksums, CPUs, IOAPIC, interrupts."""

from __future__ import annotations

import struct

import pytest

from ember.arch.x86_64 import layout, mptable
from ember.errors import ConfigError
from ember.memory import GuestMemory

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(table: bytes, base: int = layout.MPTABLE_START):
    sig, ptr, length16, rev, _cks, features = struct.unpack_from("<4sIBBB5s", table, 0)
    assert sig == b"_MP_" and length16 == 1 and rev == 4
    assert sum(table[:16]) % 256 == 0
    assert features == bytes(5)  # config table present, virtual wire mode
    config = table[ptr - base:]
    (csig, length, crev, _c, oem, product, _oemptr, _oemsize, count, lapic,
     _extlen, _extck, _r) = struct.unpack_from("<4sHBB8s12sIHHIHBB", config, 0)
    assert csig == b"PCMP" and crev == 4 and lapic == layout.LAPIC_START
    assert sum(config[:length]) % 256 == 0
    entries, offset = [], 44
    for _ in range(count):
        kind = config[offset]
        entries.append(config[offset:offset + ENTRY_SIZES[kind]])
        offset += ENTRY_SIZES[kind]
    assert offset == length
    return entries


@pytest.mark.parametrize("vcpus", [1, 2, 4, 32, 254])
def test_table_describes_the_machine(vcpus: int) -> None:
    entries = parse(mptable.build_mptable(vcpus))
    cpus = [e for e in entries if e[0] == 0]
    assert len(cpus) == vcpus
    apic_ids = [e[1] for e in cpus]
    assert sorted(apic_ids) == list(range(vcpus))
    flags = {e[1]: e[3] for e in cpus}
    assert flags[0] == 0b11  # enabled + bootstrap
    assert all(flags[i] == 0b01 for i in range(1, vcpus))
    buses = [e for e in entries if e[0] == 1]
    assert buses == [bytes([1, 0]) + b"ISA   "]
    (ioapic,) = [e for e in entries if e[0] == 2]
    _t, ioapic_id, version, enabled, addr = struct.unpack("<BBBBI", ioapic)
    assert ioapic_id not in apic_ids and ioapic_id < 255
    assert (version, enabled, addr) == (0x11, 1, layout.IOAPIC_START)
    irqs = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(i[4], i[5], i[6]) for i in irqs] == [(n, ioapic_id, n) for n in range(24)]
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(i[1], i[5], i[6]) for i in lints] == [(3, 0xFF, 0), (1, 0xFF, 1)]  # ExtINT, NMI


@pytest.mark.parametrize("vcpus", [0, 255, -1])
def test_bad_vcpu_counts(vcpus: int) -> None:
    with pytest.raises(ConfigError, match="1 to 254"):
        mptable.build_mptable(vcpus)


def test_written_into_the_reserved_ebda() -> None:
    with GuestMemory(layout.ram_regions(16 * layout.MiB)) as memory:
        size = mptable.write_mptable(memory, 254)
        assert layout.MPTABLE_START % 16 == 0
        assert layout.MPTABLE_START + size <= layout.HIMEM_START
        reserved = [e for e in layout.e820_map(16 * layout.MiB) if e.type == layout.E820_RESERVED]
        assert any(e.addr <= layout.MPTABLE_START and layout.MPTABLE_START + size <= e.addr + e.size
                   for e in reserved)
        table = memory.read(layout.MPTABLE_START, size)
        assert len([e for e in parse(table) if e[0] == 0]) == 254
