"""Thin objects over the three KVM file descriptors: system, VM and vCPU.

Each method issues one ioctl from Documentation/virt/kvm/api.rst section 4
and converts its argument and result; failures raise KvmError naming the
ioctl. No policy lives here: callers decide what to configure and when.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
from typing import Any, Iterable

from ember.errors import EmberError
from ember.kvm import ioctl as io
from ember.kvm import structs as s
from ember.kvm.ioctl import KvmError, ioctl

log = logging.getLogger(__name__)

DEFAULT_KVM_PATH = "/dev/kvm"
_CPUID_INITIAL_ENTRIES = 128
_CPUID_MAX_ENTRIES = 4096
_STATS_VALUE_SIZE = 8


class _Fd:
    """An owned file descriptor with close() and context-manager support."""

    _fd: int = -1

    @property
    def fd(self) -> int:
        return self._fd

    def _ioctl(self, request: int, arg: Any = None) -> int:
        return ioctl(self._fd, request, arg)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def stats(self) -> dict[str, int]:
        """Binary stats via KVM_GET_STATS_FD; raises KvmError if unsupported.

        Histogram stats are reported as their sum under the stat's name.
        """
        stats_fd = self._ioctl(io.KVM_GET_STATS_FD)
        try:
            return read_stats_fd(stats_fd)
        finally:
            os.close(stats_fd)


def read_stats_fd(stats_fd: int) -> dict[str, int]:
    """Parse a KVM binary stats file (api.rst "KVM_GET_STATS_FD")."""
    header = s.kvm_stats_header.from_buffer_copy(
        os.pread(stats_fd, ctypes.sizeof(s.kvm_stats_header), 0))
    desc_size = ctypes.sizeof(s.kvm_stats_desc) + header.name_size
    descs = os.pread(stats_fd, desc_size * header.num_desc, header.desc_offset)
    result: dict[str, int] = {}
    for i in range(header.num_desc):
        raw = descs[i * desc_size:(i + 1) * desc_size]
        desc = s.kvm_stats_desc.from_buffer_copy(raw)
        name = raw[ctypes.sizeof(s.kvm_stats_desc):].split(b"\0", 1)[0].decode()
        data = os.pread(stats_fd, desc.size * _STATS_VALUE_SIZE,
                        header.data_offset + desc.offset)
        values = struct.unpack(f"<{desc.size}Q", data)
        result[name] = sum(values)
    return result


class Kvm(_Fd):
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = DEFAULT_KVM_PATH) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EmberError(f"{path} does not exist: is KVM enabled on this host?") from None
        except PermissionError:
            raise EmberError(f"{path}: permission denied (add the user to the kvm group)") from None
        except OSError as exc:
            raise EmberError(f"cannot open {path}: {exc.strerror}") from None
        self.path = path
        version = self.api_version()
        if version != s.KVM_API_VERSION:
            self.close()
            raise EmberError(f"{path} speaks KVM API {version}, Ember needs {s.KVM_API_VERSION}")

    def api_version(self) -> int:
        return self._ioctl(io.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self._ioctl(io.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self._ioctl(io.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer while the kernel says E2BIG."""
        return self._get_cpuid(io.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def get_emulated_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        return self._get_cpuid(io.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID")

    def _get_cpuid(self, request: int, name: str) -> list[s.kvm_cpuid_entry2]:
        n = _CPUID_INITIAL_ENTRIES
        while True:
            cpuid = s.kvm_cpuid2_n(n)()
            cpuid.nent = n
            result, err = io.raw_ioctl(self._fd, request, ctypes.byref(cpuid))
            if result >= 0:
                return [_copy(cpuid.entries[i]) for i in range(cpuid.nent)]
            if err != errno.E2BIG or n >= _CPUID_MAX_ENTRIES:
                raise KvmError(name, err)
            n *= 2

    def get_msr_index_list(self) -> list[int]:
        return self._get_msr_list(io.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def get_msr_feature_index_list(self) -> list[int]:
        return self._get_msr_list(io.KVM_GET_MSR_FEATURE_INDEX_LIST,
                                  "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _get_msr_list(self, request: int, name: str) -> list[int]:
        probe = s.kvm_msr_list()  # nmsrs=0: the kernel answers E2BIG with the count
        result, err = io.raw_ioctl(self._fd, request, ctypes.byref(probe))
        if result < 0 and err != errno.E2BIG:
            raise KvmError(name, err)
        msr_list = s.kvm_msr_list_n(probe.nmsrs)()
        msr_list.nmsrs = probe.nmsrs
        ioctl(self._fd, request, ctypes.byref(msr_list), name=name)
        return list(msr_list.indices[:msr_list.nmsrs])

    def create_vm(self, machine_type: int = 0) -> "Vm":
        return Vm(self, self._ioctl(io.KVM_CREATE_VM, machine_type))


def _copy(obj: ctypes.Structure) -> Any:
    """An independent copy of a ctypes structure."""
    return type(obj).from_buffer_copy(obj)


class Vm(_Fd):
    """A VM file descriptor (KVM_CREATE_VM)."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self._fd = fd
        self.kvm = kvm
        self._mmap_size = kvm.vcpu_mmap_size()

    def check_extension(self, cap: int) -> int:
        return self._ioctl(io.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self._ioctl(io.KVM_ENABLE_CAP, ctypes.byref(_enable_cap(cap, args, flags)))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr,
                                               memory_size, userspace_addr)
        self._ioctl(io.KVM_SET_USER_MEMORY_REGION, ctypes.byref(region))

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl(io.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl(io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.byref(ctypes.c_uint64(addr)))

    def create_irqchip(self) -> None:
        self._ioctl(io.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = s.KVM_PIT_SPEAKER_DUMMY) -> None:
        self._ioctl(io.KVM_CREATE_PIT2, ctypes.byref(s.kvm_pit_config(flags=flags)))

    def irq_line(self, irq: int, level: int) -> None:
        self._ioctl(io.KVM_IRQ_LINE, ctypes.byref(s.kvm_irq_level(irq, level)))

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: >0 delivered, 0 blocked by the guest."""
        msi = s.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return self._ioctl(io.KVM_SIGNAL_MSI, ctypes.byref(msi))

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        irqfd = s.kvm_irqfd(fd=fd, gsi=gsi)
        if resample_fd is not None:
            irqfd.flags = s.KVM_IRQFD_FLAG_RESAMPLE
            irqfd.resamplefd = resample_fd
        self._ioctl(io.KVM_IRQFD, ctypes.byref(irqfd))

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        irqfd = s.kvm_irqfd(fd=fd, gsi=gsi, flags=s.KVM_IRQFD_FLAG_DEASSIGN)
        self._ioctl(io.KVM_IRQFD, ctypes.byref(irqfd))

    def register_ioeventfd(self, fd: int, addr: int, length: int,
                           datamatch: int | None = None, pio: bool = False) -> None:
        self._ioctl(io.KVM_IOEVENTFD, ctypes.byref(
            _ioeventfd(fd, addr, length, datamatch, pio, deassign=False)))

    def unregister_ioeventfd(self, fd: int, addr: int, length: int,
                             datamatch: int | None = None, pio: bool = False) -> None:
        self._ioctl(io.KVM_IOEVENTFD, ctypes.byref(
            _ioeventfd(fd, addr, length, datamatch, pio, deassign=True)))

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        """Queue guest writes to [addr, addr + size) in the coalesced MMIO ring instead of exiting."""
        self._ioctl(io.KVM_REGISTER_COALESCED_MMIO, ctypes.byref(s.kvm_coalesced_mmio_zone(addr=addr, size=size)))

    def get_dirty_log(self, slot: int, num_pages: int) -> bytes:
        """The slot's dirty bitmap (bit n = page n), cleared by the kernel as read."""
        nbytes = ((num_pages + 63) // 64) * 8  # the kernel writes whole longs
        bitmap = ctypes.create_string_buffer(nbytes)
        log_arg = s.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self._ioctl(io.KVM_GET_DIRTY_LOG, ctypes.byref(log_arg))
        return bitmap.raw

    def get_clock(self) -> s.kvm_clock_data:
        return self._get(io.KVM_GET_CLOCK, s.kvm_clock_data())

    def set_clock(self, clock: s.kvm_clock_data) -> None:
        self._ioctl(io.KVM_SET_CLOCK, ctypes.byref(clock))

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        return self._get(io.KVM_GET_IRQCHIP, s.kvm_irqchip(chip_id=chip_id))

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        self._ioctl(io.KVM_SET_IRQCHIP, ctypes.byref(chip))

    def get_pit2(self) -> s.kvm_pit_state2:
        return self._get(io.KVM_GET_PIT2, s.kvm_pit_state2())

    def set_pit2(self, state: s.kvm_pit_state2) -> None:
        self._ioctl(io.KVM_SET_PIT2, ctypes.byref(state))

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        return Vcpu(self, vcpu_id, self._ioctl(io.KVM_CREATE_VCPU, vcpu_id), self._mmap_size)

    def _get(self, request: int, obj: Any) -> Any:
        self._ioctl(request, ctypes.byref(obj))
        return obj


def _enable_cap(cap: int, args: Iterable[int], flags: int) -> s.kvm_enable_cap:
    arg_list = list(args)
    if len(arg_list) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
    request = s.kvm_enable_cap(cap=cap, flags=flags)
    for i, value in enumerate(arg_list):
        request.args[i] = value
    return request


def _ioeventfd(fd: int, addr: int, length: int, datamatch: int | None,
               pio: bool, deassign: bool) -> s.kvm_ioeventfd:
    flags = s.KVM_IOEVENTFD_FLAG_PIO if pio else 0
    if datamatch is not None:
        flags |= s.KVM_IOEVENTFD_FLAG_DATAMATCH
    if deassign:
        flags |= s.KVM_IOEVENTFD_FLAG_DEASSIGN
    return s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length,
                           fd=fd, flags=flags)


_libc_ioctl = io.libc_ioctl
_KVM_RUN = io.KVM_RUN
_MMIO_DATA_OFFSET = s.kvm_run.mmio.offset + s.kvm_run_mmio.data.offset
_MMIO_DATA_MAX = 8


class Vcpu(_Fd):
    """A vCPU file descriptor and its mmap'd kvm_run page."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self._fd = fd
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = memoryview(self._mmap)
        self.run_state: s.kvm_run = s.kvm_run.from_buffer(self._mmap)

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            self.run_state = None  # type: ignore[assignment]
            self._page.release()
            try:
                self._mmap.close()
            except BufferError:
                log.debug("vCPU %d: kvm_run views still alive; page unmapped by GC",
                          self.vcpu_id)
            self._mmap = None
        super().close()

    # --- running
    def run(self) -> int:
        """KVM_RUN; returns kvm_run.exit_reason (KVM_EXIT_INTR if a signal interrupted)."""
        if _libc_ioctl(self._fd, _KVM_RUN, None) < 0:  # hot path: no allocation
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return s.KVM_EXIT_INTR
            raise KvmError("KVM_RUN", err)
        return self.run_state.exit_reason

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_state.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_state.immediate_exit = int(value)

    def pio(self) -> tuple[bool, int, int, int, memoryview]:
        """The KVM_EXIT_IO exit: (is_write, port, size, count, data view)."""
        exit_io = self.run_state.io
        length = exit_io.size * exit_io.count
        start = exit_io.data_offset
        if start + length > len(self._page):
            raise KvmError("KVM_RUN", errno.EFAULT, "io data outside the kvm_run mapping")
        is_write = exit_io.direction == s.KVM_EXIT_IO_OUT
        return is_write, exit_io.port, exit_io.size, exit_io.count, self._page[start:start + length]

    def mmio(self) -> tuple[int, bool, memoryview]:
        """The KVM_EXIT_MMIO exit: (phys_addr, is_write, data view of len bytes)."""
        exit_mmio = self.run_state.mmio
        length = min(exit_mmio.len, _MMIO_DATA_MAX)
        data = self._page[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + length]
        return exit_mmio.phys_addr, bool(exit_mmio.is_write), data

    # --- registers
    def get_regs(self) -> s.kvm_regs:
        return self._get(io.KVM_GET_REGS, s.kvm_regs())

    def set_regs(self, regs: s.kvm_regs) -> None:
        self._ioctl(io.KVM_SET_REGS, ctypes.byref(regs))

    def get_sregs(self) -> s.kvm_sregs:
        return self._get(io.KVM_GET_SREGS, s.kvm_sregs())

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        self._ioctl(io.KVM_SET_SREGS, ctypes.byref(sregs))

    def get_fpu(self) -> s.kvm_fpu:
        return self._get(io.KVM_GET_FPU, s.kvm_fpu())

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        self._ioctl(io.KVM_SET_FPU, ctypes.byref(fpu))

    def get_xcrs(self) -> s.kvm_xcrs:
        return self._get(io.KVM_GET_XCRS, s.kvm_xcrs())

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        self._ioctl(io.KVM_SET_XCRS, ctypes.byref(xcrs))

    def get_xsave(self) -> s.kvm_xsave:
        return self._get(io.KVM_GET_XSAVE, s.kvm_xsave())

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        self._ioctl(io.KVM_SET_XSAVE, ctypes.byref(xsave))

    def get_debugregs(self) -> s.kvm_debugregs:
        return self._get(io.KVM_GET_DEBUGREGS, s.kvm_debugregs())

    def set_debugregs(self, debugregs: s.kvm_debugregs) -> None:
        self._ioctl(io.KVM_SET_DEBUGREGS, ctypes.byref(debugregs))

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; raises KvmError if the kernel could not read every MSR."""
        msrs = s.make_msrs(list(indices))
        count = self._ioctl(io.KVM_GET_MSRS, ctypes.byref(msrs))
        if count != msrs.nmsrs:
            bad = msrs.entries[count].index
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {bad:#x} not readable")
        return {e.index: e.data for e in msrs.entries[:count]}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS; raises KvmError if the kernel did not set every MSR."""
        msrs = s.make_msrs(values)
        count = self._ioctl(io.KVM_SET_MSRS, ctypes.byref(msrs))
        if count != msrs.nmsrs:
            bad = msrs.entries[count].index
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} not writable")

    def set_cpuid2(self, entries: Iterable[s.kvm_cpuid_entry2]) -> None:
        self._ioctl(io.KVM_SET_CPUID2, ctypes.byref(s.make_cpuid2(entries)))

    def get_lapic(self) -> s.kvm_lapic_state:
        return self._get(io.KVM_GET_LAPIC, s.kvm_lapic_state())

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        self._ioctl(io.KVM_SET_LAPIC, ctypes.byref(lapic))

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return self._get(io.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events())

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        self._ioctl(io.KVM_SET_VCPU_EVENTS, ctypes.byref(events))

    def get_mp_state(self) -> int:
        return self._get(io.KVM_GET_MP_STATE, s.kvm_mp_state()).mp_state

    def set_mp_state(self, mp_state: int) -> None:
        self._ioctl(io.KVM_SET_MP_STATE, ctypes.byref(s.kvm_mp_state(mp_state)))

    def nmi(self) -> None:
        self._ioctl(io.KVM_NMI)

    def get_tsc_khz(self) -> int:
        return self._ioctl(io.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        self._ioctl(io.KVM_SET_TSC_KHZ, khz)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self._ioctl(io.KVM_ENABLE_CAP, ctypes.byref(_enable_cap(cap, args, flags)))

    def _get(self, request: int, obj: Any) -> Any:
        self._ioctl(request, ctypes.byref(obj))
        return obj
