"""ioeventfd and irqfd: guest notifications and interrupts without userspace exits."""

from __future__ import annotations

import errno
import os
import time

import pytest

from ember.kvm import KvmError
from ember.kvm import structs as s
from tests.guests import AX, DX, KVM_SKIP_REASON, Asm, MicroGuest, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]

NOTIFY_PORT = 0x20
DONE_PORT = 0x10
MMIO_BASE = 0xD000_0000


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _wait_for_irr(vm, irq: int, timeout: float = 5.0) -> bool:
    """Poll the master PIC's IRR: irqfd injects non-MSI GSIs from a kernel workqueue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & (1 << irq):
            return True
        time.sleep(0.001)
    return False


def _notify_then_done(value: int) -> bytes:
    return (Asm().mov(AX, value).mov(DX, NOTIFY_PORT).out(1)
            .mov(DX, DONE_PORT).out(1).hlt().bytes())


def test_pio_ioeventfd_signals_without_exit():
    efd = _eventfd()
    try:
        with MicroGuest(_notify_then_done(1)) as guest:
            guest.vm.register_ioeventfd(efd, NOTIFY_PORT, 1, pio=True)
            assert guest.run_until_exit() == s.KVM_EXIT_IO
            assert guest.vcpus[0].pio()[1] == DONE_PORT  # the notify never exited
            assert _pending(efd) == 1
    finally:
        os.close(efd)


def test_ioeventfd_datamatch_only_fires_on_match_and_unregister_restores_exits():
    efd = _eventfd()
    try:
        with MicroGuest(_notify_then_done(5)) as guest:
            guest.vm.register_ioeventfd(efd, NOTIFY_PORT, 1, datamatch=7, pio=True)
            assert guest.run_until_exit() == s.KVM_EXIT_IO
            assert guest.vcpus[0].pio()[1] == NOTIFY_PORT  # 5 != 7: normal exit
            assert _pending(efd) == 0
            guest.vm.unregister_ioeventfd(efd, NOTIFY_PORT, 1, datamatch=7, pio=True)
            with pytest.raises(KvmError) as info:
                guest.vm.unregister_ioeventfd(efd, NOTIFY_PORT, 1, datamatch=7, pio=True)
            assert info.value.errno == errno.ENOENT
    finally:
        os.close(efd)


def test_mmio_ioeventfd_signals_without_exit():
    efd = _eventfd()
    code = Asm().mov(AX, 3).store(0x50, 4, es=True).mov(DX, DONE_PORT).out(1).hlt().bytes()
    try:
        with MicroGuest(code) as guest:
            guest.set_segment_base("es", MMIO_BASE)
            guest.vm.register_ioeventfd(efd, MMIO_BASE + 0x50, 4)
            assert guest.run_until_exit() == s.KVM_EXIT_IO
            assert _pending(efd) == 1
    finally:
        os.close(efd)


def test_irqfd_raises_line_on_in_kernel_pic():
    efd = _eventfd()
    gsi = 5
    try:
        with MicroGuest(Asm().hlt().bytes(), irqchip=True) as guest:
            guest.vm.register_irqfd(efd, gsi)
            with pytest.raises(KvmError) as info:
                guest.vm.register_irqfd(efd, gsi)  # the same eventfd twice
            assert info.value.errno == errno.EBUSY
            os.eventfd_write(efd, 1)
            assert _wait_for_irr(guest.vm, gsi), "irqfd write never reached the PIC"
            guest.vm.unregister_irqfd(efd, gsi)
    finally:
        os.close(efd)


def test_irqfd_with_resample_fd_registers():
    efd, resample = _eventfd(), _eventfd()
    try:
        with MicroGuest(Asm().hlt().bytes(), irqchip=True) as guest:
            guest.vm.register_irqfd(efd, 10, resample_fd=resample)
            guest.vm.unregister_irqfd(efd, 10)
    finally:
        os.close(efd)
        os.close(resample)


def test_irq_line_sets_pic_irr():
    with MicroGuest(Asm().hlt().bytes(), irqchip=True) as guest:
        guest.vm.irq_line(3, 1)
        assert guest.vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & (1 << 3)
        guest.vm.irq_line(3, 0)
