"""Micro-guests on /dev/kvm: PIO, MMIO and HLT exits reach the host correctly."""

from __future__ import annotations

import pytest

from ember.kvm import structs as s
from tests.guests import AX, DX, KVM_SKIP_REASON, Asm, MicroGuest, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]

RESULT_ADDR = 0x2000
MMIO_BASE = 0xD000_0000  # nothing is mapped here


def test_hlt_without_irqchip_exits_to_userspace():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        assert guest.run_until_exit() == s.KVM_EXIT_HLT


@pytest.mark.parametrize("size,value", [(1, 0xA5), (2, 0xBEEF), (4, 0xDEADBEEF)])
def test_out_reaches_host_with_port_size_and_data(size, value):
    code = Asm().mov32(AX, value).mov(DX, 0x3F8).out(size).hlt().bytes()
    with MicroGuest(code) as guest:
        assert guest.run_until_exit() == s.KVM_EXIT_IO
        is_write, port, got_size, count, data = guest.vcpus[0].pio()
        assert (is_write, port, got_size, count) == (True, 0x3F8, size, 1)
        assert int.from_bytes(data, "little") == value
        assert guest.run_until_exit() == s.KVM_EXIT_HLT


@pytest.mark.parametrize("size,value", [(1, 0x5A), (2, 0x1234), (4, 0xCAFEF00D)])
def test_in_returns_host_value_in_register(size, value):
    code = Asm().mov32(AX, 0).mov(DX, 0x60).in_(size).hlt().bytes()
    seen = []

    def on_io(is_write, port, got_size, data):
        seen.append((is_write, port, got_size))
        data[:] = value.to_bytes(got_size, "little")

    with MicroGuest(code) as guest:
        assert guest.run_until_exit(on_io=on_io) == s.KVM_EXIT_HLT
        assert seen == [(False, 0x60, size)]
        assert guest.vcpus[0].get_regs().rax & 0xFFFFFFFF == value


@pytest.mark.parametrize("size,value", [(1, 0x77), (2, 0xABCD), (4, 0x01020304)])
def test_mmio_write_to_unmapped_gpa_exits_with_address_and_data(size, value):
    code = Asm().mov32(AX, value).store(0x10, size, es=True).hlt().bytes()
    with MicroGuest(code) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        assert guest.run_until_exit() == s.KVM_EXIT_MMIO
        addr, is_write, data = guest.vcpus[0].mmio()
        assert (addr, is_write, len(data)) == (MMIO_BASE + 0x10, True, size)
        assert int.from_bytes(data, "little") == value
        assert guest.run_until_exit() == s.KVM_EXIT_HLT


@pytest.mark.parametrize("size,value", [(1, 0x99), (2, 0x4321), (4, 0x89ABCDEF)])
def test_mmio_read_returns_host_value(size, value):
    code = Asm().load(0x20, size, es=True).store(RESULT_ADDR, size).hlt().bytes()
    reads = []

    def on_mmio(addr, is_write, data):
        reads.append((addr, is_write, len(data)))
        data[:] = value.to_bytes(len(data), "little")

    with MicroGuest(code) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        assert guest.run_until_exit(on_mmio=on_mmio) == s.KVM_EXIT_HLT
        assert reads == [(MMIO_BASE + 0x20, False, size)]
        assert int.from_bytes(guest.memory.read(RESULT_ADDR, size), "little") == value


def test_guest_and_host_see_each_others_ram_writes():
    host_value, guest_value = 0x1357, 0x2468
    code = (Asm().load(0x3000, 2).mov(DX, 0x10).out(2)
            .mov(AX, guest_value).store(0x4000, 2).hlt().bytes())
    with MicroGuest(code) as guest:
        guest.memory.write_u16(0x3000, host_value)
        assert guest.run_until_exit() == s.KVM_EXIT_IO
        assert int.from_bytes(guest.vcpus[0].pio()[4], "little") == host_value
        assert guest.run_until_exit() == s.KVM_EXIT_HLT
        assert bytes(guest.memory.view(0x4000, 2)) == guest_value.to_bytes(2, "little")


def test_loop_guest_counts_down_and_reports():
    from tests.guests import time_loop_guest
    assert time_loop_guest(1000) < 5.0


def test_immediate_exit_returns_intr_without_running():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        vcpu = guest.vcpus[0]
        vcpu.immediate_exit = True
        assert vcpu.immediate_exit
        assert vcpu.run() == s.KVM_EXIT_INTR
        assert vcpu.get_regs().rip == 0x1000  # nothing ran
        vcpu.immediate_exit = False
        assert guest.run_until_exit() == s.KVM_EXIT_HLT
