"""Each get/set pair round-trips vCPU and VM state through the kernel."""

from __future__ import annotations

import ctypes

import pytest

from ember.kvm import Kvm
from ember.kvm import structs as s
from tests.guests import DX, KVM_SKIP_REASON, Asm, MicroGuest, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175


@pytest.fixture
def guest():
    with MicroGuest(Asm().hlt().bytes(), irqchip=True) as g:
        yield g


def test_system_queries():
    with Kvm() as kvm:
        assert kvm.api_version() == s.KVM_API_VERSION
        assert kvm.vcpu_mmap_size() >= ctypes.sizeof(s.kvm_run)
        assert kvm.check_extension(s.KVM_CAP_USER_MEMORY) > 0
        leaves = {entry.function for entry in kvm.get_supported_cpuid()}
        assert {0x0, 0x1} <= leaves
        assert 0x10 in kvm.get_msr_index_list()  # IA32_TIME_STAMP_COUNTER


def test_regs_and_sregs_round_trip(guest):
    vcpu = guest.vcpus[0]
    regs = vcpu.get_regs()
    regs.rbx, regs.r15, regs.rip = 0x1122334455667788, 0xF00D, 0x1234
    vcpu.set_regs(regs)
    got = vcpu.get_regs()
    assert (got.rbx, got.r15, got.rip) == (0x1122334455667788, 0xF00D, 0x1234)
    sregs = vcpu.get_sregs()
    sregs.ds.base, sregs.cr2 = 0x50000, 0xABC000
    vcpu.set_sregs(sregs)
    got_sregs = vcpu.get_sregs()
    assert (got_sregs.ds.base, got_sregs.cr2) == (0x50000, 0xABC000)


def test_fpu_xcrs_xsave_debugregs_round_trip(guest):
    vcpu = guest.vcpus[0]
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.xmm[3][0] = 0xAB
    vcpu.set_fpu(fpu)  # note: PVM does not round-trip mxcsr through KVM_SET_FPU
    got = vcpu.get_fpu()
    assert (got.fcw, got.xmm[3][0]) == (0x37F, 0xAB)
    xcrs = vcpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # x87 always enabled
    vcpu.set_xcrs(xcrs)
    vcpu.set_xsave(vcpu.get_xsave())
    debugregs = vcpu.get_debugregs()
    debugregs.db[1] = 0x4000
    vcpu.set_debugregs(debugregs)
    assert vcpu.get_debugregs().db[1] == 0x4000


def test_msrs_round_trip(guest):
    vcpu = guest.vcpus[0]
    vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10, MSR_IA32_SYSENTER_ESP: 0x8000})
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP]) == {
        MSR_IA32_SYSENTER_CS: 0x10, MSR_IA32_SYSENTER_ESP: 0x8000}


def test_cpuid_lapic_events_mp_state(guest):
    vcpu = guest.vcpus[0]
    vcpu.set_cpuid2(guest.kvm.get_supported_cpuid())
    lapic = vcpu.get_lapic()
    assert len(bytes(lapic.regs)) == s.KVM_APIC_REG_SIZE
    lapic_version = int.from_bytes(bytes(lapic.regs[0x30:0x34]), "little")
    assert lapic_version & 0xFF in (0x14, 0x15)  # integrated APIC (Intel SDM 11.4.8)
    vcpu.set_lapic(lapic)
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    assert vcpu.get_mp_state() == s.KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(s.KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == s.KVM_MP_STATE_HALTED


def test_vm_clock_irqchip_and_pit_round_trip(guest):
    vm = guest.vm
    clock = vm.get_clock()
    clock.clock = 10**9
    clock.flags = 0
    vm.set_clock(clock)
    assert vm.get_clock().clock >= 10**9
    ioapic = vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)
    ioapic.chip.ioapic.redirtbl[4] = 0x10030
    vm.set_irqchip(ioapic)
    assert vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[4] == 0x10030
    vm.create_pit2()
    pit = vm.get_pit2()
    pit.channels[0].count = 0x1000
    vm.set_pit2(pit)
    assert vm.get_pit2().channels[0].count == 0x1000


def test_binary_stats_count_exits():
    code = Asm().mov(DX, 0x10).out(1).hlt().bytes()
    with MicroGuest(code) as guest:
        if not guest.kvm.check_extension(s.KVM_CAP_BINARY_STATS_FD):
            pytest.skip("kernel lacks KVM_CAP_BINARY_STATS_FD")
        guest.run_until_exit(on_io=lambda *a: None)
        stats = guest.vcpus[0].stats()
        # PVM emulates the OUT (counted in insn_emulation, not io_exits)
        assert stats["exits"] >= 2 and stats["halt_exits"] >= 1
        assert "pages_4k" in guest.vm.stats()
