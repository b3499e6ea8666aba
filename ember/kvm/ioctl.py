"""KVM ioctl request numbers and the call that issues them.

Numbers are computed with the _IOC rules of include/uapi/asm-generic/ioctl.h
from the ctypes structure sizes, exactly as <linux/kvm.h> defines them
(Documentation/virt/kvm/api.rst section 4). Failures raise KvmError.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
from typing import Any

from ember.errors import EmberError
from ember.kvm import structs as s

# asm-generic/ioctl.h
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit _IOC_SIZEBITS")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _size(ctype: Any) -> int:
    return ctypes.sizeof(ctype)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype: Any) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(ctype))


def _IOW(type_: int, nr: int, ctype: Any) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(ctype))


def _IOWR(type_: int, nr: int, ctype: Any) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(ctype))


# --- /dev/kvm (system) ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _IOWR(KVMIO, 0x09, s.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, s.kvm_msr_list)

# --- VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, s.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, s.kvm_irqchip)  # sic: _IOR in the kernel ABI
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, s.kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, s.kvm_coalesced_mmio_zone)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, s.kvm_pit_state2)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, s.kvm_msi)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, s.kvm_enable_cap)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)

# --- vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, s.kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, s.kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, s.kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, s.kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, s.kvm_xcrs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)

# Several requests share a number (e.g. KVM_GET_PIT2/KVM_GET_VCPU_EVENTS differ
# only by size); callers pass the name, this map is for diagnostics only.
REQUEST_NAMES: dict[int, str] = {}
for _name, _value in list(globals().items()):
    if _name.startswith("KVM_") and isinstance(_value, int) and _name != "KVMIO":
        REQUEST_NAMES.setdefault(_value, _name)


class KvmError(EmberError):
    """A KVM ioctl failed; the message names the ioctl and the errno."""

    def __init__(self, ioctl_name: str, errno: int, detail: str = "") -> None:
        self.ioctl_name = ioctl_name
        self.errno = errno
        code = errno_mod.errorcode.get(errno, f"errno {errno}")
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"{ioctl_name} failed: {code} ({os.strerror(errno)}){suffix}")


_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc_ioctl.restype = ctypes.c_int


def raw_ioctl(fd: int, request: int, arg: Any = None) -> tuple[int, int]:
    """Issue ioctl without raising: (return value, errno or 0). Releases the GIL."""
    result = libc_ioctl(fd, request, arg)
    return result, (ctypes.get_errno() if result < 0 else 0)


def ioctl(fd: int, request: int, arg: Any = None, *, name: str | None = None) -> int:
    """Issue ioctl(fd, request, arg); raise KvmError naming it on failure.

    ``arg`` is None, an int (passed by value) or ctypes.byref(struct).
    """
    result = libc_ioctl(fd, request, arg)
    if result < 0:
        raise KvmError(name or REQUEST_NAMES.get(request, hex(request)), ctypes.get_errno())
    return result
