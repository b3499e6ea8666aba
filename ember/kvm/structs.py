"""ctypes mirrors of the KVM userspace ABI structures for x86-64.

Names and field names follow <linux/kvm.h> and <asm/kvm.h> (Linux 6.1) and
Documentation/virt/kvm/api.rst section 4; layouts are checked against the
kernel headers by tests/unit/test_kvm_ioctls.py.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Iterable

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s16 = ctypes.c_int16
s32 = ctypes.c_int32
s64 = ctypes.c_int64

KVM_API_VERSION = 12
PAGE_SIZE = 4096

# --- Exit reasons (kvm_run.exit_reason) -------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5

# --- Capabilities (KVM_CHECK_EXTENSION) --------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_INTR_SHADOW = 49
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_ASYNC_PF = 59
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SYNC_REGS = 74
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_EXT_EMUL_CPUID = 95
KVM_CAP_IOAPIC_POLARITY_IGNORED = 97
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_VM_ATTRIBUTES = 101
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_X86_SMM = 117
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_NESTED_STATE = 157
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_HALT_POLL = 182
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_SREGS2 = 200
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYS_ATTRIBUTES = 209
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218

CAP_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name.startswith("KVM_CAP_") and isinstance(value, int)
}

# --- Flags -------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1
KVM_PIT_FLAGS_HPET_LEGACY = 0x1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3
KVM_IOAPIC_NUM_PINS = 24

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2

KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_NR_INTERRUPTS = 256
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16
KVM_XSAVE_SIZE = 4096

KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2
KVM_STATS_TYPE_LINEAR_HIST = 0x3
KVM_STATS_TYPE_LOG_HIST = 0x4


class _Struct(ctypes.Structure):
    """Base for ABI structures: readable repr of the scalar fields."""

    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            value = getattr(self, name)
            if isinstance(value, int):
                parts.append(f"{name}={value:#x}")
        return f"{type(self).__name__}({', '.join(parts)})"


# --- Memory, interrupts, eventfds -------------------------------------------
class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_irq_level(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]  # irq aliases s32 status


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32),
                ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_coalesced_mmio_zone(_Struct):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]  # pio aliases pad


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32),
                ("fd", s32), ("flags", u32), ("pad", u8 * 36)]


class kvm_dirty_log(_Struct):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", ctypes.c_void_p)]


class kvm_clock_data(_Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32),
                ("flags", u32), ("devid", u32), ("pad", u8 * 12)]


class kvm_enable_cap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- In-kernel irqchip and PIT -----------------------------------------------
class kvm_pic_state(_Struct):
    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base",
        "read_reg_select", "poll", "special_mask", "init_state", "auto_eoi",
        "rotate_on_auto_eoi", "special_fully_nested_mode", "init4", "elcr",
        "elcr_mask")]


class kvm_ioapic_state(_Struct):
    """redirtbl entries are the raw 64-bit redirection words (``bits``)."""

    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32),
                ("irr", u32), ("pad", u32), ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS)]


class _kvm_irqchip_chip(ctypes.Union):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state),
                ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(_Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _kvm_irqchip_chip)]


class kvm_pit_channel_state(_Struct):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8),
                ("mode", u8), ("bcd", u8), ("gate", u8), ("count_load_time", s64)]


class kvm_pit_state2(_Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32),
                ("reserved", u32 * 9)]


# --- vCPU registers ------------------------------------------------------------
class kvm_regs(_Struct):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_Struct):
    _fields_ = [(name, kvm_segment) for name in
                ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(_Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64),
                ("last_dp", u64), ("xmm", (u8 * 16) * 16), ("mxcsr", u32),
                ("pad2", u32)]


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_xsave(_Struct):
    _fields_ = [("region", u32 * (KVM_XSAVE_SIZE // 4))]


class kvm_debugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


class _kvm_vcpu_events_exception(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8),
                ("pending", u8), ("error_code", u32)]


class _kvm_vcpu_events_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _kvm_vcpu_events_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _kvm_vcpu_events_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8),
                ("latched_init", u8)]


class _kvm_vcpu_events_triple_fault(_Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [("exception", _kvm_vcpu_events_exception),
                ("interrupt", _kvm_vcpu_events_interrupt),
                ("nmi", _kvm_vcpu_events_nmi), ("sipi_vector", u32), ("flags", u32),
                ("smi", _kvm_vcpu_events_smi),
                ("triple_fault", _kvm_vcpu_events_triple_fault),
                ("reserved", u8 * 26), ("exception_has_payload", u8),
                ("exception_payload", u64)]


# --- MSRs and CPUID (variable length) ------------------------------------------
class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]  # + kvm_msr_entry entries[]


class kvm_msr_list(_Struct):
    _fields_ = [("nmsrs", u32)]  # + __u32 indices[]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]  # + kvm_cpuid_entry2 entries[]


@lru_cache(maxsize=64)
def kvm_msrs_n(n: int) -> type[ctypes.Structure]:
    """The kvm_msrs layout with room for ``n`` entries."""
    return type(f"kvm_msrs_{n}", (_Struct,), {
        "_fields_": [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]})


@lru_cache(maxsize=64)
def kvm_msr_list_n(n: int) -> type[ctypes.Structure]:
    """The kvm_msr_list layout with room for ``n`` indices."""
    return type(f"kvm_msr_list_{n}", (_Struct,), {
        "_fields_": [("nmsrs", u32), ("indices", u32 * n)]})


@lru_cache(maxsize=64)
def kvm_cpuid2_n(n: int) -> type[ctypes.Structure]:
    """The kvm_cpuid2 layout with room for ``n`` entries."""
    return type(f"kvm_cpuid2_{n}", (_Struct,), {
        "_fields_": [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]})


def make_msrs(entries: dict[int, int] | Iterable[int]) -> ctypes.Structure:
    """A filled kvm_msrs: from {index: data} (for SET) or indices (for GET)."""
    pairs = list(entries.items()) if isinstance(entries, dict) else [(i, 0) for i in entries]
    msrs = kvm_msrs_n(len(pairs))()
    msrs.nmsrs = len(pairs)
    for slot, (index, data) in enumerate(pairs):
        msrs.entries[slot].index = index
        msrs.entries[slot].data = data
    return msrs


def make_cpuid2(entries: Iterable[kvm_cpuid_entry2]) -> ctypes.Structure:
    """A filled kvm_cpuid2 holding copies of ``entries``."""
    items = list(entries)
    cpuid = kvm_cpuid2_n(len(items))()
    cpuid.nent = len(items)
    for slot, entry in enumerate(items):
        ctypes.memmove(ctypes.byref(cpuid.entries[slot]), ctypes.byref(entry),
                       ctypes.sizeof(kvm_cpuid_entry2))
    return cpuid


# --- Binary statistics (KVM_GET_STATS_FD) --------------------------------------
class kvm_stats_header(_Struct):
    _fields_ = [("flags", u32), ("name_size", u32), ("num_desc", u32),
                ("id_offset", u32), ("desc_offset", u32), ("data_offset", u32)]


class kvm_stats_desc(_Struct):
    _fields_ = [("flags", u32), ("exponent", s16), ("size", u16), ("offset", u32),
                ("bucket_size", u32)]  # + char name[header.name_size]


# --- The shared kvm_run page ----------------------------------------------------
class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_debug_exit_arch(_Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64),
                ("dr7", u64)]


class kvm_run_debug(_Struct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hypercall(_Struct):
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("longmode", u32),
                ("pad", u32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]  # data[0] aliases flags


class kvm_run_msr(_Struct):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32),
                ("data", u64)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry),
                ("ex", kvm_run_ex), ("io", kvm_run_io), ("debug", kvm_run_debug),
                ("mmio", kvm_run_mmio), ("hypercall", kvm_run_hypercall),
                ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
                ("msr", kvm_run_msr), ("padding", u8 * 256)]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(_Struct):
    """The page KVM shares with a vCPU; exit data lives in the anonymous union."""

    _anonymous_ = ("_exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("_exit", _kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
                ("s", u8 * SYNC_REGS_SIZE_BYTES)]
