"""The vCPU run loop: KVM_RUN, decode the exit, dispatch it to the buses.

Each vCPU thread spends its life in KVM_RUN (which releases the GIL) and
only decodes exits here (KVM API: "The kvm_run structure"). PIO and MMIO
exits go to the device buses; shutdown, internal errors and failed entries
end the VM. Every exit is counted and timed in the thread's ExitStats. Writes
KVM queued in the coalesced MMIO ring are replayed first (mmio_replay.py), so
devices see the guest's accesses in program order.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from ember.host_modules import HOST_MODULE_MARK, host_module_at
from ember.kvm import structs as k
from ember.outcome import ExitInfo, ExitReason

log = logging.getLogger(__name__)

REASON_NAMES = {value: name[len("KVM_EXIT_"):].lower()
                for name, value in vars(k).items()
                if name.startswith("KVM_EXIT_") and isinstance(value, int)}


INTERNAL_ERRORS = {
    k.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    k.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    k.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    k.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}


MP_STATES = {value: name[len("KVM_MP_STATE_"):].lower()
             for name, value in vars(k).items() if name.startswith("KVM_MP_STATE_") and isinstance(value, int)}
RFLAGS_IF = 1 << 9


def describe_vcpu(vcpu) -> str:
    """Where a vCPU (not in KVM_RUN) is: its registers, whether it takes interrupts, its run state."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    mp_state = MP_STATES.get(vcpu.get_mp_state(), "?")
    line = (f"vCPU {vcpu.vcpu_id} at rip {regs.rip:#x}, rsp {regs.rsp:#x}, rflags {regs.rflags:#x} "
            f"(interrupts {'on' if regs.rflags & RFLAGS_IF else 'off'}), cr0 {sregs.cr0:#x}, cr3 {sregs.cr3:#x}, "
            f"idt {sregs.idt.base:#x}+{sregs.idt.limit:#x}, mp_state {mp_state}")
    module = host_module_at(regs.rip)
    if module is not None:
        line += (f"; that rip {HOST_MODULE_MARK} {module} (a guest kernel without modules cannot be there: "
                 "the host's own state in the guest's registers, an emulator or host-kernel fault)")
    return line


class VcpuLoop:
    """Runs one vCPU until the guest stops it or the host asks it to."""

    def __init__(self, vcpu, pio_bus, mmio_bus, stats, coalesced=None) -> None:
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.stats = stats
        self.coalesced = coalesced  # the VM's CoalescedReplay, or None

    def run(self, should_return: Callable[[], bool]):
        """Loop in KVM_RUN. Returns an ExitInfo when the VM must end, None when asked to return."""
        vcpu, record, clock, queued = self.vcpu, self.stats.record, time.perf_counter_ns, self.coalesced
        while True:
            reason = vcpu.run()
            start = clock()
            if queued is not None and queued.replay_if_pending():
                start = clock()
            if reason == k.KVM_EXIT_IO:
                record("io", self._pio(), clock() - start)
            elif reason == k.KVM_EXIT_MMIO:
                record("mmio", self._mmio(), clock() - start)
            elif reason == k.KVM_EXIT_INTR:
                record("intr", None, 0)
                if should_return():
                    return None
            elif reason == k.KVM_EXIT_HLT:
                record("hlt", None, 0)
                return ExitInfo(ExitReason.POWEROFF, detail="vCPU halted")
            elif reason == k.KVM_EXIT_SHUTDOWN:
                record("shutdown", None, 0)
                return self._shutdown()
            elif reason == k.KVM_EXIT_INTERNAL_ERROR:
                record("internal_error", None, 0)
                return self._internal_error()
            elif reason == k.KVM_EXIT_FAIL_ENTRY:
                record("fail_entry", None, 0)
                reason_code = self.vcpu.run_state.fail_entry.hardware_entry_failure_reason
                return ExitInfo(ExitReason.ERROR, detail=f"VM entry failed (hardware reason {reason_code:#x})")
            elif reason == k.KVM_EXIT_SYSTEM_EVENT:
                record("system_event", None, 0)
                return self._system_event()
            else:
                name = REASON_NAMES.get(reason, str(reason))
                record(name, None, 0)
                return ExitInfo(ExitReason.ERROR, detail=f"unhandled VM exit {name}")

    def _pio(self) -> str:
        is_write, port, size, count, data = self.vcpu.pio()
        bus = self.pio_bus
        for i in range(count):
            chunk = data[i * size:(i + 1) * size]
            if is_write:
                bus.write(port, bytes(chunk))
            else:
                chunk[:] = bus.read(port, size)
        return f"pio:{port:#x}"

    def _mmio(self) -> str:
        addr, is_write, data = self.vcpu.mmio()
        if is_write:
            self.mmio_bus.write(addr, bytes(data))
        else:
            data[:] = self.mmio_bus.read(addr, len(data))
        return f"mmio:{addr & ~0xFFF:#x}"

    def _shutdown(self) -> ExitInfo:
        """KVM_EXIT_SHUTDOWN: the guest triple-faulted; say which vCPU, and where."""
        return ExitInfo(ExitReason.TRIPLE_FAULT,
                        detail=f"guest triple-faulted (KVM_EXIT_SHUTDOWN) on {describe_vcpu(self.vcpu)}")

    def _internal_error(self) -> ExitInfo:
        """KVM could not go on; simultaneous exceptions are the guest's triple fault."""
        suberror = self.vcpu.run_state.internal.suberror
        if suberror == k.KVM_INTERNAL_ERROR_SIMUL_EX:
            return ExitInfo(ExitReason.TRIPLE_FAULT, detail="simultaneous exceptions (KVM internal error)")
        name = INTERNAL_ERRORS.get(suberror, f"suberror {suberror}")
        regs = self.vcpu.get_regs()
        return ExitInfo(ExitReason.ERROR, detail=f"KVM internal error: {name} at rip {regs.rip:#x}")

    def _system_event(self):
        kind = self.vcpu.run_state.system_event.type
        if kind == k.KVM_SYSTEM_EVENT_RESET:
            return ExitInfo(ExitReason.REBOOT, detail="system reset event")
        if kind == k.KVM_SYSTEM_EVENT_CRASH:
            return ExitInfo(ExitReason.PANIC, detail="guest crash event")
        return ExitInfo(ExitReason.POWEROFF, detail="system shutdown event")
