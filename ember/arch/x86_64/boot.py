"""Boot an x86-64 Linux guest: the one entry point the machine calls.

Loads the kernel and initrd, writes the zero page, command line, GDT, page
tables and MP table (Linux boot protocol, Documentation/arch/x86/boot.rst,
"64-bit Boot Protocol"), then sets each vCPU's CPUID, MSRs, FPU and, for the
BSP, the long-mode entry state.  APs wait for the guest's INIT-SIPI.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from . import gdt, mptable, paging, regs
from .boot_params import write_boot_params
from .cpuid import build_cpuid
from .initrd import load_initrd
from .kernel import LoadedKernel, load_kernel

log = logging.getLogger(__name__)

BSP_ID = 0


@dataclass(frozen=True)
class BootInfo:
    entry: int  # gpa of the kernel's 64-bit entry
    zero_page: int  # gpa of boot_params, passed in RSI
    kernel: LoadedKernel
    initrd: tuple[int, int] | None  # (gpa, size)


def load_guest(memory, *, kernel_path: str | os.PathLike, initrd_path: str | os.PathLike | None,
               cmdline: str, mem_size: int, vcpu_count: int) -> BootInfo:
    """Put the kernel, initrd and every boot structure into guest memory."""
    mptable.build_mptable(vcpu_count)  # reject a bad vCPU count before loading anything
    kernel = load_kernel(memory, kernel_path)
    initrd = None
    if initrd_path is not None:
        initrd = load_initrd(memory, initrd_path, kernel, mem_size)
    zero_page = write_boot_params(memory, kernel, cmdline, initrd, mem_size)
    gdt.write_gdt(memory)
    paging.write_page_tables(memory)
    mptable.write_mptable(memory, vcpu_count)
    return BootInfo(kernel.entry, zero_page, kernel, initrd)


def configure_vcpu(vcpu, boot: BootInfo, vcpu_id: int, vcpu_count: int, supported_cpuid, *,
                   tsc_deadline: bool = False) -> None:
    """CPUID, MSRs, FPU and LAPIC LINTs for every vCPU; long-mode entry for the BSP."""
    vcpu.set_cpuid2(build_cpuid(supported_cpuid, vcpu_id, vcpu_count, tsc_deadline=tsc_deadline))
    vcpu.set_msrs(regs.boot_msrs())
    vcpu.set_fpu(regs.setup_fpu(vcpu.get_fpu()))
    if hasattr(vcpu, "get_lapic"):
        lapic = vcpu.get_lapic()
        regs.set_lint(lapic)
        vcpu.set_lapic(lapic)
    if vcpu_id == BSP_ID:
        sregs = vcpu.get_sregs()
        regs.configure_sregs(sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs.boot_regs(boot.entry, boot.zero_page))
    log.debug("configured vCPU %d of %d", vcpu_id, vcpu_count)
