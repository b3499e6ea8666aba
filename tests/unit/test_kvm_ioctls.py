"""ioctl numbers and ABI layouts match the kernel's <linux/kvm.h> (x86-64)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from ember.errors import EmberError
from ember.kvm import KvmError
from ember.kvm import ioctl as io
from ember.kvm import structs as s

# Well-known values (Linux 6.1 <linux/kvm.h>, as printed by a C program).
KNOWN_REQUESTS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_GET_STATS_FD": 0xAECE,
}

KNOWN_SIZES = {
    "kvm_regs": 144, "kvm_sregs": 312, "kvm_segment": 24, "kvm_dtable": 16,
    "kvm_fpu": 416, "kvm_xcrs": 392, "kvm_lapic_state": 1024, "kvm_vcpu_events": 64,
    "kvm_userspace_memory_region": 32, "kvm_irqfd": 32, "kvm_ioeventfd": 64,
    "kvm_irqchip": 520, "kvm_pit_state2": 112, "kvm_clock_data": 48,
    "kvm_cpuid_entry2": 40, "kvm_msr_entry": 16, "kvm_run": 2352,
    "kvm_stats_header": 24, "kvm_stats_desc": 16, "kvm_xsave": 4096,
}

KVM_RUN_OFFSETS = {  # offsetof(struct kvm_run, ...)
    "immediate_exit": 1, "exit_reason": 8, "if_flag": 13, "cr8": 16, "apic_base": 24,
    "io": 32, "mmio": 32, "kvm_valid_regs": 288, "kvm_dirty_regs": 296, "s": 304,
}


@pytest.mark.parametrize("name,value", sorted(KNOWN_REQUESTS.items()))
def test_request_numbers_match_kernel(name, value):
    assert getattr(io, name) == value


@pytest.mark.parametrize("name,size", sorted(KNOWN_SIZES.items()))
def test_struct_sizes_match_kernel(name, size):
    assert ctypes.sizeof(getattr(s, name)) == size


@pytest.mark.parametrize("field,offset", sorted(KVM_RUN_OFFSETS.items()))
def test_kvm_run_layout(field, offset):
    assert getattr(s.kvm_run, field).offset == offset


def test_exit_union_member_layouts():
    assert (s.kvm_run_io.size.offset, s.kvm_run_io.port.offset,
            s.kvm_run_io.count.offset, s.kvm_run_io.data_offset.offset) == (1, 2, 4, 8)
    assert (s.kvm_run_mmio.data.offset, s.kvm_run_mmio.len.offset,
            s.kvm_run_mmio.is_write.offset) == (8, 16, 20)
    assert s.kvm_run_system_event.data.offset == 8
    assert s.kvm_run_internal.data.offset == 8


def test_ioc_rules():
    assert io._IOC(io._IOC_READ | io._IOC_WRITE, 0xAE, 0x05, 8) == 0xC008AE05
    with pytest.raises(ValueError):
        io._IOC(io._IOC_READ, 0xAE, 0, 1 << 14)


def test_variable_length_helpers():
    msrs = s.make_msrs({0x10: 5, 0x174: 8})
    assert ctypes.sizeof(msrs) == 8 + 2 * 16 and msrs.nmsrs == 2
    assert (msrs.entries[1].index, msrs.entries[1].data) == (0x174, 8)
    entry = s.kvm_cpuid_entry2(function=1, eax=0x806F8)
    cpuid = s.make_cpuid2([entry, entry])
    assert ctypes.sizeof(cpuid) == 8 + 2 * 40 and cpuid.entries[1].eax == 0x806F8
    assert s.kvm_msr_list_n(3).indices.offset == 4


def test_kvm_error_names_ioctl_and_errno():
    err = KvmError("KVM_CREATE_VM", 13)
    assert str(err) == "KVM_CREATE_VM failed: EACCES (Permission denied)"
    assert isinstance(err, EmberError) and err.errno == 13


def test_failed_ioctl_raises_kvm_error_naming_request():
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(KvmError, match=r"^KVM_GET_API_VERSION failed: ENOTTY"):
            io.ioctl(fd, io.KVM_GET_API_VERSION)
    finally:
        os.close(fd)


HEADER = "/usr/include/linux/kvm.h"


@pytest.mark.skipif(not (shutil.which("cc") and os.path.exists(HEADER)),
                    reason="needs a C compiler and linux-libc-dev's <linux/kvm.h>")
def test_everything_against_the_installed_kernel_header(tmp_path):
    """Compile a program printing every request number and struct size we define."""
    requests = {n: v for n, v in vars(io).items()
                if n.startswith("KVM_") and isinstance(v, int) and n != "KVMIO"}
    structs = [n for n, t in vars(s).items() if n.startswith("kvm_") and isinstance(t, type)
               and issubclass(t, ctypes.Structure) and not n.startswith("kvm_run_")]
    lines = ["#include <linux/kvm.h>", "#include <stdio.h>", "int main(void) {"]
    lines += [f'printf("{n} %lu\\n", (unsigned long){n});' for n in requests]
    lines += [f'printf("{n} %zu\\n", sizeof(struct {n}));' for n in structs]
    lines += ["return 0; }"]
    (tmp_path / "k.c").write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "k"), str(tmp_path / "k.c")], check=True)
    output = subprocess.run([str(tmp_path / "k")], check=True, capture_output=True, text=True)
    pairs = (line.split() for line in output.stdout.splitlines())
    kernel = {name: int(value) for name, value in pairs}
    ours = {**requests, **{n: ctypes.sizeof(getattr(s, n)) for n in structs}}
    assert ours == kernel
