"""Long-mode entry state: GDT, identity page tables, sregs/regs, MSRs, FPU, LAPIC LINTs."""

from __future__ import annotations

import ctypes
import struct

from ember.arch.x86_64 import gdt, layout, paging, regs
from ember.kvm.structs import kvm_lapic_state, kvm_sregs
from ember.memory import GuestMemory

MiB = layout.MiB


def test_gdt_selectors_match_the_boot_protocol() -> None:
    table = gdt.boot_gdt()
    code = gdt.decode(table[0x10 // 8], 0x10)
    data = gdt.decode(table[0x18 // 8], 0x18)
    assert table[0] == 0
    # __BOOT_CS: 64-bit flat execute/read code, DPL 0
    assert (code.base, code.limit, code.type, code.s, code.l, code.db, code.present, code.dpl) == \
        (0, 0xFFFF_FFFF, 0xB, 1, 1, 0, 1, 0)
    # __BOOT_DS: flat read/write data
    assert (data.base, data.limit, data.type, data.s, data.db, data.present) == \
        (0, 0xFFFF_FFFF, 0x3, 1, 1, 1)


def test_gdt_entry_encoding_round_trips() -> None:
    entry = gdt.gdt_entry(0xA09B, 0x1234_5678, 0xABCDE)
    seg = gdt.decode(entry, 8)
    assert seg.base == 0x1234_5678
    assert seg.limit == (0xABCDE << 12) | 0xFFF
    assert gdt.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF_9B00_0000_FFFF
    assert gdt.gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF_9300_0000_FFFF


def test_gdt_and_idt_written() -> None:
    with GuestMemory(layout.ram_regions(16 * MiB)) as memory:
        gdt.write_gdt(memory)
        raw = memory.read(layout.GDT_START, gdt.gdt_limit() + 1)
        assert list(struct.unpack(f"<{len(raw) // 8}Q", raw)) == gdt.boot_gdt()
        assert memory.read(layout.IDT_START, layout.IDT_SIZE) == bytes(layout.IDT_SIZE)


def _walk(memory, cr3: int, va: int) -> int:
    """Translate through PML4 -> PDPT -> PD with 2 MiB pages."""
    pml4e = memory.read_u64(cr3 + ((va >> 39) & 511) * 8)
    assert pml4e & 3 == 3
    pdpte = memory.read_u64((pml4e & ~0xFFF) + ((va >> 30) & 511) * 8)
    assert pdpte & 3 == 3 and not pdpte & 0x80
    pde = memory.read_u64((pdpte & ~0xFFF) + ((va >> 21) & 511) * 8)
    assert pde & 0x83 == 0x83
    return (pde & ~0x1F_FFFF & ((1 << 52) - 1)) | (va & 0x1F_FFFF)


def test_page_tables_identity_map_4gib() -> None:
    with GuestMemory(layout.ram_regions(16 * MiB)) as memory:
        cr3 = paging.write_page_tables(memory)
        assert cr3 == layout.PML4_START
        for va in (0, 0x7000, 0x10_0000, 0x100_0200, 0x3FFF_FFFF, 0x4000_0000,
                   0xBFFF_FFFF, 0xFEE0_0000, 0xFFFF_FFFF):
            assert _walk(memory, cr3, va) == va
        assert paging.IDENTITY_MAPPED == 4 * layout.GiB
        # nothing mapped past 4 GiB
        assert memory.read_u64(layout.PDPT_START + 4 * 8) == 0


def test_sregs_long_mode() -> None:
    sregs = kvm_sregs()
    sregs.cr0 = 0x6000_0010  # reset value: CD, NW, ET
    regs.configure_sregs(sregs)
    assert sregs.cr0 & (1 << 0) and sregs.cr0 & (1 << 31)  # PE, PG
    assert not sregs.cr0 & (3 << 29)  # caches on
    assert sregs.cr4 & (1 << 5)  # PAE
    assert sregs.efer & (1 << 8) and sregs.efer & (1 << 10)  # LME, LMA
    assert sregs.cr3 == layout.PML4_START
    assert sregs.cs.selector == 0x10 and sregs.cs.l == 1
    for seg in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        assert seg.selector == 0x18 and seg.type == 3 and seg.present == 1
    assert sregs.tr.selector == 0x20 and sregs.tr.type == 0xB and sregs.tr.s == 0
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.GDT_START, 5 * 8 - 1)
    assert (sregs.idt.base, sregs.idt.limit) == (layout.IDT_START, 7)


def test_boot_regs() -> None:
    r = regs.boot_regs(0x100_0000, layout.ZERO_PAGE_START)
    assert r.rip == 0x100_0000
    assert r.rsi == layout.ZERO_PAGE_START
    assert r.rflags == 2  # IF clear
    assert r.rsp == r.rbp == layout.BOOT_STACK_POINTER


def test_boot_msrs() -> None:
    msrs = regs.boot_msrs()
    assert msrs[0x1A0] & 1  # IA32_MISC_ENABLE.FAST_STRING
    assert msrs[0x2FF] == 0x806  # MTRRdefType: enabled, write-back
    for index in (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083,
                  0xC0000084, 0xC0000102, 0x10):
        assert msrs[index] == 0


def test_fpu_defaults() -> None:
    fpu = regs.setup_fpu()
    assert fpu.fcw == 0x37F and fpu.mxcsr == 0x1F80


def test_lint_virtual_wire() -> None:
    lapic = kvm_lapic_state()
    raw = bytearray(0x400)
    struct.pack_into("<I", raw, 0x350, 0x0001_0700)  # masked, some mode
    struct.pack_into("<I", raw, 0x360, 0x0001_0000)
    struct.pack_into("<I", raw, 0x370, 0xDEAD_BEEF)
    ctypes.memmove(ctypes.addressof(lapic), bytes(raw), len(raw))
    regs.set_lint(lapic)
    out = bytes(lapic)
    assert struct.unpack_from("<I", out, 0x350)[0] == 0x0001_0700  # ExtINT
    assert struct.unpack_from("<I", out, 0x360)[0] == 0x0001_0400  # NMI
    assert struct.unpack_from("<I", out, 0x370)[0] == 0xDEAD_BEEF
