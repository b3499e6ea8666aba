"""Coalesced MMIO on /dev/kvm: writes to a registered zone queue in the ring without
exiting; the vCPU loop replays them, in order, before the exit that follows, and a
queue notify served on the event loop replays them before the device sees it."""

from __future__ import annotations

import pytest

from ember.devices.bus import Bus
from ember.exitstats import ExitStats
from ember.kvm import structs as s
from ember.eventloop import EventLoop
from ember.kvm.coalesced import CoalescedMmioRing
from ember.machine import QueueNotifier
from ember.mmio_replay import CoalescedReplay
from ember.outcome import ExitReason
from ember.vcpu_loop import VcpuLoop
from tests.guests import AX, KVM_SKIP_REASON, Asm, MicroGuest, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]

MMIO_BASE = 0xD000_0000
ACK = 0x64      # coalesced, like virtio-mmio's InterruptACK
STATUS = 0x70   # an ordinary register: its write exits
NOTIFY = 0x50   # served by an ioeventfd, like virtio-mmio's QueueNotify


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def notify(self, queue: int) -> None:  # the transport side of an ioeventfd
        self.writes.append((NOTIFY, queue))

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, int.from_bytes(data, "little")))


def guest_code() -> bytes:
    asm = Asm()
    for value in (0x11, 0x22, 0x33):
        asm.mov32(AX, value).store(ACK, 4, es=True)
    return asm.mov32(AX, 0x99).store(STATUS, 4, es=True).hlt().bytes()


def ring_for(guest: MicroGuest) -> CoalescedMmioRing:
    page = guest.kvm.check_extension(s.KVM_CAP_COALESCED_MMIO)
    assert page > 0, "this KVM has no coalesced MMIO ring"
    guest.vm.register_coalesced_mmio(MMIO_BASE + ACK, 4)
    return CoalescedMmioRing(guest.vcpus[0].fd, page)


def test_zone_writes_wait_in_the_ring_while_other_writes_exit():
    with MicroGuest(guest_code()) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        ring = ring_for(guest)
        try:
            assert guest.run_until_exit() == s.KVM_EXIT_MMIO  # the first exit is the STATUS write
            addr, is_write, data = guest.vcpus[0].mmio()
            assert (addr, is_write, int.from_bytes(data, "little")) == (MMIO_BASE + STATUS, True, 0x99)
            replayed: list[tuple[int, bytes]] = []
            assert ring.pending()
            assert ring.drain(lambda a, d: replayed.append((a, d))) == 3
            assert replayed == [(MMIO_BASE + ACK, v.to_bytes(4, "little")) for v in (0x11, 0x22, 0x33)]
            assert not ring.pending() and ring.drain(lambda a, d: None) == 0
        finally:
            ring.close()


def test_the_vcpu_loop_replays_queued_writes_before_the_exit_after_them():
    with MicroGuest(guest_code()) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        ring = ring_for(guest)
        device, bus = Recorder(), Bus()
        bus.register(MMIO_BASE, 0x1000, device, name="recorder")
        stats, replay = ExitStats(), CoalescedReplay(ring, bus)
        try:
            outcome = VcpuLoop(guest.vcpus[0], Bus(), bus, stats, replay).run(lambda: False)
        finally:
            ring.close()
        assert outcome.reason is ExitReason.POWEROFF  # the guest's hlt, no irqchip
        assert device.writes == [(ACK, 0x11), (ACK, 0x22), (ACK, 0x33), (STATUS, 0x99)]
        assert stats.as_dict()["by_reason"]["mmio"]["count"] == 1  # only STATUS exited
        assert replay.stats[f"mmio:{MMIO_BASE:#x}"].count == 3


def test_a_queue_notify_replays_the_writes_the_guest_made_before_it():
    asm = Asm()
    for value in (0x11, 0x22):
        asm.mov32(AX, value).store(ACK, 4, es=True)
    code = asm.mov32(AX, 1).store(NOTIFY, 4, es=True).hlt().bytes()
    with MicroGuest(code) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        ring = ring_for(guest)
        device, bus, loop = Recorder(), Bus(), EventLoop()
        bus.register(MMIO_BASE, 0x1000, device, name="recorder")
        replay = CoalescedReplay(ring, bus)
        notifier = QueueNotifier(guest.vm, loop, device, MMIO_BASE + NOTIFY, 1, replay.replay_if_pending)
        try:
            assert guest.run_until_exit() == s.KVM_EXIT_HLT  # the notify went to the eventfd, no exit
            notifier._fired()  # what the event loop does when the eventfd is readable
            assert device.writes == [(ACK, 0x11), (ACK, 0x22), (NOTIFY, 1)]
            assert not replay.pending() and replay.replay() == 0  # nothing left for the vCPU
        finally:
            notifier.close()
            loop.close()
            ring.close()


def test_a_closed_ring_reads_as_empty():
    """Teardown closes the ring while the event loop may still serve a notify."""
    with MicroGuest(guest_code()) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        ring = ring_for(guest)
        assert guest.run_until_exit() == s.KVM_EXIT_MMIO
        assert ring.pending()
        ring.close()
        assert not ring.pending() and ring.drain(lambda a, d: None) == 0


def test_raising_an_interrupt_first_applies_the_acks_kvm_queued():
    """The guest acknowledged the first interrupt (queued in the ring, no exit); the device then
    completes a second request. Its interrupt must survive that ACK: the transport replays the
    ring before it sets InterruptStatus, so the late ACK clears only the first."""
    from ember.devices.virtio import mmio
    from ember.devices.virtio.mirror import RegisterMirror
    from ember.devices.virtio.rng import RngDevice
    from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
    from tests.fakes import RecordingIrq

    code = Asm().mov32(AX, mmio.INT_USED_BUFFER).store(ACK, 4, es=True).hlt().bytes()
    with MicroGuest(code, mem_size=0x40000) as guest:
        guest.set_segment_base("es", MMIO_BASE)
        ring = ring_for(guest)
        mirror = RegisterMirror()
        transport = mmio.VirtioMmioTransport(RngDevice(queue_size=8), guest.memory, RecordingIrq(), mirror)
        bus = Bus()
        bus.register(MMIO_BASE, 0x1000, transport, name="rng")
        replay = CoalescedReplay(ring, bus)
        transport.catch_up = replay.replay_if_pending
        try:
            driver = MmioDriver(transport, guest.memory, BumpAllocator(0x10000, 0x40000))
            (queue,) = driver.start(features=mmio.VIRTIO_F_VERSION_1)
            queue.add_chain([driver.buffer(4, write=True)])
            driver.kick(0)  # first interrupt
            assert mirror.word(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER
            assert guest.run_until_exit() == s.KVM_EXIT_HLT  # the guest's ACK waits in the ring
            assert replay.pending()
            queue.add_chain([driver.buffer(4, write=True)])
            driver.kick(0)  # second interrupt
            assert not replay.pending()
            assert mirror.word(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER
        finally:
            transport.close()
            mirror.close()
            ring.close()
