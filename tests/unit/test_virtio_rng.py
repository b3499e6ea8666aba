"""virtio-rng (VIRTIO 1.2 5.4) end to end through the MMIO transport."""

import pytest

from ember.devices.virtio import mmio
from ember.devices.virtio.rng import RngDevice
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.memory import GuestMemory
from tests.fakes import RecordingIrq

RAM = 1 << 20


@pytest.fixture()
def rng():
    memory = GuestMemory([(0, RAM)])
    irq = RecordingIrq()
    transport = mmio.VirtioMmioTransport(RngDevice(request_cap=4096), memory, irq)
    driver = MmioDriver(transport, memory, BumpAllocator(0x1000, RAM))
    (queue,) = driver.start()
    yield memory, driver, queue, irq
    transport.close()
    memory.close()


def test_identity(rng):
    _, driver, _, _ = rng
    assert driver.read32(mmio.REG_DEVICE_ID) == 4
    assert driver.read32(mmio.REG_QUEUE_NUM_MAX) == 256


def test_fills_buffers_with_random_bytes(rng):
    memory, driver, queue, irq = rng
    a, b = driver.buffer(64, write=True), driver.buffer(64, write=True)
    head = queue.add_chain([a, b])
    driver.kick(0)
    assert queue.take_used() == [(head, 128)]
    data = memory.read(a.gpa, 64) + memory.read(b.gpa, 64)
    assert data != bytes(128) and len(set(data)) > 20
    assert irq.count == 1


def test_caps_bytes_per_request(rng):
    memory, driver, queue, _ = rng
    buf = driver.buffer(10000, write=True)
    head = queue.add_chain([buf])
    driver.kick(0)
    assert queue.take_used() == [(head, 4096)]
    assert memory.read(buf.gpa + 4096, 10000 - 4096) == bytes(10000 - 4096)


def test_readable_only_chain_gets_nothing(rng):
    _, driver, queue, _ = rng
    head = queue.add_chain([driver.buffer(b"abc")])
    driver.kick(0)
    assert queue.take_used() == [(head, 0)]
