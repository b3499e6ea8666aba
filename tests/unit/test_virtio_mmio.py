"""virtio-mmio transport (VIRTIO 1.2 4.2): registers, negotiation, status, interrupts, fuzzing."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.virtio import mmio
from ember.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from ember.devices.virtio.mirror import RegisterMirror
from ember.devices.virtio.rng import RngDevice
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.memory import GuestMemory
from tests.fakes import RecordingIrq

RAM = 1 << 20


TRANSPORTS = []


@pytest.fixture()
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    while TRANSPORTS:
        TRANSPORTS.pop().close()
    mem.close()


def make_rig(memory, mirror: RegisterMirror | None = None):
    irq = RecordingIrq()
    transport = mmio.VirtioMmioTransport(RngDevice(queue_size=16), memory, irq, mirror)
    TRANSPORTS.append(transport)
    driver = MmioDriver(transport, memory, BumpAllocator(0x1000, RAM))
    return transport, driver, irq


@pytest.fixture(params=["exits", "mirror"])
def rig(request, memory):
    """Every transport test runs twice: the driver reading registers through exits
    (transport.read) and from the guest-readable mirror."""
    mirror = RegisterMirror() if request.param == "mirror" else None
    transport, driver, irq = make_rig(memory, mirror)
    yield transport, driver, irq
    if mirror is not None:
        transport.close()  # it publishes to the mirror until then
        TRANSPORTS.remove(transport)
        mirror.close()


def test_identity_registers(rig):
    transport, driver, _ = rig
    assert driver.read32(mmio.REG_MAGIC) == 0x74726976
    assert driver.read32(mmio.REG_VERSION) == 2
    assert driver.read32(mmio.REG_DEVICE_ID) == 4
    assert driver.device_features() & VIRTIO_F_VERSION_1
    driver.write32(mmio.REG_QUEUE_SEL, 0)
    assert driver.read32(mmio.REG_QUEUE_NUM_MAX) == 16
    driver.write32(mmio.REG_QUEUE_SEL, 1)
    assert driver.read32(mmio.REG_QUEUE_NUM_MAX) == 0  # no such queue
    assert transport.num_queues == 1


def test_bad_accesses_read_zero_and_never_raise(rig):
    transport, _, _ = rig
    assert transport.read(1, 4) == bytes(4)  # unaligned
    assert transport.read(0, 2) == bytes(2)  # wrong size
    assert transport.read(0x100 + 4096, 4) == bytes(4)  # past the config space
    transport.write(0x70, b"\x01")  # 1-byte status write is ignored
    assert transport.status == 0


def test_features_without_version_1_are_refused(rig):
    _, driver, _ = rig
    assert not driver.negotiate(features=0)


def test_features_the_device_did_not_offer_are_refused(rig):
    _, driver, _ = rig
    assert not driver.negotiate(features=VIRTIO_F_VERSION_1 | (1 << 5))
    assert driver.negotiate(features=VIRTIO_F_VERSION_1)


def test_driver_ok_requires_features_ok(rig):
    _, driver, _ = rig
    driver.write32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
    driver.write32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER | mmio.STATUS_DRIVER_OK)
    assert not driver.read32(mmio.REG_STATUS) & mmio.STATUS_DRIVER_OK


def test_notify_interrupt_and_ack(rig):
    transport, driver, irq = rig
    (queue,) = driver.start()
    head = queue.add_chain([driver.buffer(32, write=True)])
    driver.kick(0)
    assert queue.take_used() == [(head, 32)]
    assert irq.count == 1
    assert driver.ack_interrupts() == mmio.INT_USED_BUFFER
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) == 0


def test_a_late_ack_never_hides_an_interrupt_raised_after_it(rig):
    """KVM may queue the driver's ACK in its coalesced ring and Ember replay it late.
    Raising an interrupt replays what is queued first, so the ACK of the first interrupt
    cannot clear the second, which the driver has not seen yet."""
    transport, driver, irq = rig
    queued: list[bytes] = []  # the coalesced ring, as seen from the transport
    transport.catch_up = lambda: [transport.write(mmio.REG_INTERRUPT_ACK, queued.pop(0)) for _ in list(queued)]
    (queue,) = driver.start(features=VIRTIO_F_VERSION_1)  # no EVENT_IDX: every completion interrupts
    queue.add_chain([driver.buffer(8, write=True)])
    driver.kick(0)
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER  # the ISR's read...
    queued.append(mmio.INT_USED_BUFFER.to_bytes(4, "little"))  # ...its ACK, queued by KVM...
    queue.add_chain([driver.buffer(8, write=True)])
    driver.kick(0)  # ...a second completion and interrupt
    assert irq.count == 2 and not queued
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER  # the second is not lost
    driver.write32(mmio.REG_INTERRUPT_ACK, mmio.INT_USED_BUFFER)
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) == 0


def test_an_ack_clears_the_bits_it_names(rig):
    transport, driver, _ = rig
    driver.start()
    transport.config_changed()
    queue = driver.queues[0]
    queue.add_chain([driver.buffer(8, write=True)])
    driver.kick(0)
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER | mmio.INT_CONFIG_CHANGE
    driver.write32(mmio.REG_INTERRUPT_ACK, mmio.INT_CONFIG_CHANGE)
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER


def test_notify_from_event_loop_path(rig):
    transport, driver, irq = rig
    (queue,) = driver.start()
    queue.add_chain([driver.buffer(8, write=True)])
    transport.notify(0)  # what the event loop does when the ioeventfd fires
    transport.notify(5)  # no such queue: ignored
    assert len(queue.take_used()) == 1


def test_reset_clears_everything(rig):
    transport, driver, _ = rig
    driver.start()
    driver.write32(mmio.REG_STATUS, 0)
    assert transport.status == 0
    driver.write32(mmio.REG_QUEUE_SEL, 0)
    assert driver.read32(mmio.REG_QUEUE_READY) == 0
    assert driver.read32(mmio.REG_QUEUE_DESC_LOW) == 0
    assert not transport.queues[0].active
    driver.start()  # and the device works again
    head = driver.queues[0].add_chain([driver.buffer(4, write=True)])
    driver.kick(0)
    assert driver.queues[0].take_used() == [(head, 4)]


def test_event_idx_negotiated_end_to_end(rig):
    transport, driver, irq = rig
    (queue,) = driver.start(features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    queue.set_used_event(5)  # the driver only wants an interrupt after 6 used buffers
    for _ in range(3):
        queue.add_chain([driver.buffer(4, write=True)])
        driver.kick(0)
    assert len(queue.take_used()) == 3
    assert irq.count == 0


def test_bad_ring_address_sets_needs_reset(rig):
    transport, driver, irq = rig
    driver.negotiate()
    driver.write32(mmio.REG_QUEUE_SEL, 0)
    driver.write32(mmio.REG_QUEUE_NUM, 16)
    driver.write32(mmio.REG_QUEUE_DESC_LOW, 0)
    driver.write32(mmio.REG_QUEUE_DESC_HIGH, 0x10)  # far outside RAM
    driver.write32(mmio.REG_QUEUE_READY, 1)
    driver.write32(mmio.REG_STATUS, 0xF)
    assert transport.status & mmio.STATUS_DEVICE_NEEDS_RESET
    assert driver.read32(mmio.REG_INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE
    assert irq.count == 1


def test_hostile_chain_sets_needs_reset_and_stops(rig, memory):
    transport, driver, irq = rig
    (queue,) = driver.start()
    queue.write_descriptor(queue.desc, 0, 0x8000, 1, 1, 0)  # NEXT pointing at itself: a loop
    queue.publish(0)
    driver.kick(0)
    assert transport.status & mmio.STATUS_DEVICE_NEEDS_RESET
    assert irq.count == 1
    driver.kick(0)  # further kicks are ignored until reset
    assert irq.count == 1


def test_cmdline_param():
    assert mmio.cmdline_param(0xD0001000, 0x1000, 5) == "virtio_mmio.device=4K@0xd0001000:5"


def test_snapshot_round_trip(rig, memory):
    transport, driver, irq = rig
    (queue,) = driver.start()
    queue.add_chain([driver.buffer(4, write=True)])
    driver.kick(0)
    state = transport.save_state()
    clone = mmio.VirtioMmioTransport(RngDevice(queue_size=16), memory, irq)
    TRANSPORTS.append(clone)
    clone.restore_state(state)
    assert clone.status == transport.status
    assert clone.queues[0].active and clone.queues[0].state.next_avail == 1
    head = queue.add_chain([driver.buffer(4, write=True)])
    clone.notify(0)
    assert queue.take_used()[-1] == (head, 4)


# -- fuzzing ----------------------------------------------------------------------------
offsets = st.one_of(st.sampled_from([0x0, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64,
                                     0x70, 0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4, 0xFC, 0x100, 0x104]),
                    st.integers(0, 0x1000))
values = st.one_of(st.sampled_from([0, 1, 0xF, 0xB, 0x1000, 0x2000, 0x3000, 16, 0xFFFFFFFF]),
                   st.integers(0, 0xFFFFFFFF))
accesses = st.tuples(st.booleans(), offsets, st.sampled_from([1, 2, 4, 8, 3]), values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(accesses, max_size=60))
def test_fuzz_register_accesses_never_raise(rig, memory, ops):
    transport, _, _ = rig
    memory.write(0, bytes(0x10000))
    transport.reset()
    for is_write, offset, size, value in ops:
        if is_write:
            transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(transport.read(offset, size)) == size
    status = transport.status
    assert status & ~(mmio.DRIVER_STATUS_BITS | mmio.STATUS_DEVICE_NEEDS_RESET) == 0
    if status & mmio.STATUS_DRIVER_OK:
        assert status & mmio.STATUS_FEATURES_OK
    transport.write(0x70, bytes(4))  # reset always brings it back
    assert transport.status == 0 and not any(q.active for q in transport.queues)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=256, max_size=256), avail_idx=st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)))
def test_fuzz_hostile_queue_contents(memory, blob, avail_idx):
    transport, driver, _ = make_rig(memory)
    (queue,) = driver.start()
    memory.write(queue.desc, blob)  # 16 garbage descriptors
    memory.write(queue.avail + 4, blob[:32])  # garbage ring entries
    memory.write_u16(queue.avail + 2, avail_idx)
    transport.notify(0)  # must not raise
    if transport.status & mmio.STATUS_DEVICE_NEEDS_RESET:
        assert transport.state.interrupt_status & mmio.INT_CONFIG_CHANGE
    else:  # garbage buffers may even land on the rings; the device still stays consistent
        assert transport.queues[0].state.next_used == transport.queues[0].state.next_avail


def test_queue_ready_toggle_after_driver_ok(rig):
    transport, driver, _ = rig
    (queue,) = driver.start()
    driver.write32(mmio.REG_QUEUE_SEL, 0)
    driver.write32(mmio.REG_QUEUE_READY, 0)  # Linux's vm_del_vq, then reads it back
    assert driver.read32(mmio.REG_QUEUE_READY) == 0
    assert not transport.queues[0].active
    driver.write32(mmio.REG_QUEUE_READY, 1)
    assert transport.queues[0].active
    head = queue.add_chain([driver.buffer(4, write=True)])
    driver.kick(0)
    assert queue.take_used() == [(head, 4)]


# -- the mirror -------------------------------------------------------------------------
READABLE = [offset for offset in range(0, mmio.REG_CONFIG, 4)]
events = st.one_of(
    accesses.map(lambda access: ("access", access)),
    st.sampled_from([("notify", 0), ("config_changed", None), ("reset", None), ("start", None)]),
)


def assert_mirror_matches(transport):
    mirror = transport.mirror
    for offset in READABLE:
        assert mirror.word(offset) == int.from_bytes(transport.read(offset, 4), "little"), hex(offset)
    config = transport.device.config_bytes()
    assert mirror.read(mmio.REG_CONFIG, len(config)) == config
    assert not any(mirror.read(mmio.REG_CONFIG + len(config), 0x1000 - mmio.REG_CONFIG - len(config)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(events, max_size=40))
def test_the_mirror_always_shows_what_a_register_read_would(memory, script):
    """Whatever the driver writes and whatever the device does, a load from the mirror
    returns what the same load would through an exit (transport.read)."""
    memory.write(0, bytes(0x10000))
    mirror = RegisterMirror()
    transport, driver, _ = make_rig(memory, mirror)
    try:
        assert_mirror_matches(transport)
        for kind, arg in script:
            if kind == "access":
                is_write, offset, size, value = arg
                if is_write:
                    transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            elif kind == "notify":
                if driver.queues:
                    driver.queues[0].add_chain([driver.buffer(4, write=True)])
                transport.notify(arg)
            elif kind == "config_changed":
                transport.config_changed()
            elif kind == "reset":
                transport.reset()
            else:
                driver.heap = BumpAllocator(0x1000, RAM)
                driver.start()
            assert_mirror_matches(transport)
    finally:
        transport.close()
        TRANSPORTS.remove(transport)
        mirror.close()


def test_a_restored_transport_publishes_its_registers(memory):
    transport, driver, _ = make_rig(memory)
    (queue,) = driver.start()
    queue.add_chain([driver.buffer(4, write=True)])
    driver.kick(0)
    mirror = RegisterMirror()
    clone = mmio.VirtioMmioTransport(RngDevice(queue_size=16), memory, RecordingIrq(), mirror)
    TRANSPORTS.append(clone)
    clone.restore_state(transport.save_state())
    assert mirror.word(mmio.REG_STATUS) == transport.status
    assert mirror.word(mmio.REG_INTERRUPT_STATUS) == mmio.INT_USED_BUFFER
    assert_mirror_matches(clone)


def test_a_device_that_fails_shows_needs_reset_before_its_interrupt(memory):
    mirror = RegisterMirror()
    irq = RecordingIrq()
    seen: list[int] = []
    irq_trigger = irq.trigger
    irq.trigger = lambda: (seen.append(mirror.word(mmio.REG_STATUS)), irq_trigger())
    transport = mmio.VirtioMmioTransport(RngDevice(queue_size=16), memory, irq, mirror)
    TRANSPORTS.append(transport)
    driver = MmioDriver(transport, memory, BumpAllocator(0x1000, RAM))
    (queue,) = driver.start()
    memory.write_u16(queue.avail + 2, 40)  # more buffers than the queue holds: broken
    transport.notify(0)
    assert seen and seen[-1] & mmio.STATUS_DEVICE_NEEDS_RESET
    assert mirror.word(mmio.REG_INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE


def test_describe_shows_who_waits_for_whom(rig):
    transport, driver, _ = rig
    assert "queue 0: size 0, not active" in transport.describe()
    (queue,) = driver.start()
    queue.add_chain([driver.buffer(4, write=True)])  # the driver posted a buffer, no kick yet
    report = transport.describe()
    assert "avail idx 1 (device at 0)" in report and "used idx 0 (device at 0" in report
    driver.kick(0)
    report = transport.describe()
    assert "avail idx 1 (device at 1)" in report and "used idx 1 (device at 1" in report
    assert "InterruptStatus 0x1" in report and "interrupts raised" in report
    assert ("guest sees 0x1" in report) == (transport.mirror is not None)
