"""vCPU register state for the Linux 64-bit boot protocol.

Documentation/arch/x86/boot.rst ("64-bit Boot Protocol"): long mode with
paging, CS = __BOOT_CS, DS/ES/SS = __BOOT_DS, interrupts off, RSI = zero page.
MSR and FPU defaults follow Firecracker's arch/x86_64/regs.rs and msr.rs;
KVM structures per Documentation/virt/kvm/api.rst 4.12-4.23.
"""

from __future__ import annotations

import ctypes

from ember.kvm.structs import KVM_APIC_REG_SIZE, kvm_fpu, kvm_regs

from . import gdt, layout

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 is always set; IF stays clear

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITE_BACK = 6

FPU_FCW_DEFAULT = 0x37F  # all x87 exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_DELIVERY_MODE_MASK = 0x700
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def configure_sregs(sregs) -> None:
    """Put a kvm_sregs into long mode with the boot GDT and identity page tables."""
    table = gdt.boot_gdt()
    code = gdt.decode(table[gdt.BOOT_CS // gdt.DESCRIPTOR_SIZE], gdt.BOOT_CS)
    data = gdt.decode(table[gdt.BOOT_DS // gdt.DESCRIPTOR_SIZE], gdt.BOOT_DS)
    tss = gdt.decode(table[gdt.BOOT_TSS // gdt.DESCRIPTOR_SIZE], gdt.BOOT_TSS)
    _set_segment(sregs.cs, code)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _set_segment(getattr(sregs, name), data)
    _set_segment(sregs.tr, tss)
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_START, gdt.gdt_limit()
    sregs.idt.base, sregs.idt.limit = layout.IDT_START, layout.IDT_SIZE - 1
    sregs.cr0 = (sregs.cr0 & ~(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.cr3 = layout.PML4_START
    sregs.cr4 |= X86_CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA


def _set_segment(target, segment: gdt.Segment) -> None:
    for name, value in segment._asdict().items():
        setattr(target, name, value)


def boot_regs(entry: int, zero_page: int) -> kvm_regs:
    """General registers for the BSP at the kernel's 64-bit entry."""
    regs = kvm_regs()
    regs.rip = entry
    regs.rsi = zero_page
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rflags = RFLAGS_RESERVED
    return regs


def boot_msrs() -> dict[int, int]:
    """MSR values every vCPU starts with."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITE_BACK,
    }


def setup_fpu(fpu: kvm_fpu | None = None) -> kvm_fpu:
    """Default x87/SSE control words (fills ``fpu`` in place, or a new one)."""
    fpu = kvm_fpu() if fpu is None else fpu
    fpu.fcw = FPU_FCW_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    return fpu


def set_lint(lapic) -> None:
    """Local APIC LINT0 = ExtINT (the PIC), LINT1 = NMI: virtual wire mode (MP spec 3.6.2)."""
    regs = (ctypes.c_uint8 * KVM_APIC_REG_SIZE).from_buffer(lapic)
    view = memoryview(regs).cast("B")
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(view[offset:offset + 4], "little")
        value = (value & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)
        view[offset:offset + 4] = value.to_bytes(4, "little")
