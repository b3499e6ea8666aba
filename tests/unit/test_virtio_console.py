"""virtio-console, single port (VIRTIO 1.2 5.3), through the MMIO transport."""

import pytest

from ember.devices.virtio import mmio
from ember.devices.virtio.console import ConsoleDevice
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.memory import GuestMemory
from tests.fakes import RecordingIrq

RAM = 1 << 20


@pytest.fixture()
def console():
    memory = GuestMemory([(0, RAM)])
    output = []
    device = ConsoleDevice(output.append, queue_size=16)
    transport = mmio.VirtioMmioTransport(device, memory, RecordingIrq())
    driver = MmioDriver(transport, memory, BumpAllocator(0x1000, RAM))
    yield memory, device, driver, output
    transport.close()
    memory.close()


def test_guest_output_reaches_host(console):
    _, _, driver, output = console
    rx, tx = driver.start()
    head = tx.add_chain([driver.buffer(b"hello "), driver.buffer(b"world\n")])
    driver.kick(1)
    assert output == [b"hello world\n"]
    assert tx.take_used() == [(head, 0)]


def test_host_input_waits_for_receive_buffers(console):
    memory, device, driver, _ = console
    device.enqueue_input(b"early")  # before the driver is up: kept
    rx, _ = driver.start()
    buf = driver.buffer(3, write=True)
    head = rx.add_chain([buf])
    driver.kick(0)
    assert rx.take_used() == [(head, 3)] and memory.read(buf.gpa, 3) == b"ear"
    device.enqueue_input(b"!")
    assert rx.take_used() == []  # no buffer posted yet
    buf2 = driver.buffer(8, write=True)
    head2 = rx.add_chain([buf2])
    driver.kick(0)
    assert rx.take_used() == [(head2, 3)] and memory.read(buf2.gpa, 3) == b"ly!"
