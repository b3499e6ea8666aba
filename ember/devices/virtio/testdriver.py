"""A minimal virtio-mmio driver, the guest side, for tests (VIRTIO 1.2 3.1, 2.7, 4.2.3).

It negotiates features, lays out split virtqueues in guest memory the way
Linux does, posts direct and indirect chains, kicks and reads used entries,
all through a transport's MMIO read/write entry points.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ember.devices.virtio import mmio
from ember.devices.virtio.queue import (
    DESC_FORMAT,
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

PAGE = 4096


class BumpAllocator:
    """Hands out guest-physical ranges from [base, end)."""

    def __init__(self, base: int, end: int) -> None:
        self.next, self.end = base, end

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = -(-self.next // align) * align
        if gpa + size > self.end:
            raise MemoryError("test driver heap exhausted")
        self.next = gpa + size
        return gpa


@dataclass
class Buffer:
    """One buffer of a chain: where it is, how long, and whether the device writes it."""

    gpa: int
    length: int
    write: bool = False


@dataclass
class DriverQueue:
    """The driver's view of one split virtqueue."""

    memory: object
    size: int
    desc: int
    avail: int
    used: int
    next_desc: int = 0
    avail_idx: int = 0
    last_used: int = 0
    heads: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, memory, heap: BumpAllocator, size: int) -> DriverQueue:
        desc = heap.alloc(DESC_SIZE * size, PAGE)
        avail = heap.alloc(4 + 2 * size + 2, 2)
        used = heap.alloc(4 + 8 * size + 2, PAGE)
        for gpa, length in ((desc, DESC_SIZE * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
            memory.write(gpa, bytes(length))
        return cls(memory, size, desc, avail, used)

    def _take_descriptor(self) -> int:
        index = self.next_desc % self.size
        self.next_desc += 1
        return index

    def write_descriptor(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(table + DESC_SIZE * index, DESC_FORMAT.pack(addr, length, flags, nxt))

    def add_chain(self, buffers: list[Buffer]) -> int:
        """Post a direct chain (descriptors taken round-robin); returns its head."""
        indices = [self._take_descriptor() for _ in buffers]
        for i, (index, buf) in enumerate(zip(indices, buffers)):
            last = i == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if buf.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_descriptor(self.desc, index, buf.gpa, buf.length, flags, 0 if last else indices[i + 1])
        return self.publish(indices[0])

    def add_indirect(self, buffers: list[Buffer], heap: BumpAllocator) -> int:
        """Post one descriptor pointing at an indirect table of the buffers."""
        table = heap.alloc(DESC_SIZE * len(buffers), 16)
        for i, buf in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if buf.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_descriptor(table, i, buf.gpa, buf.length, flags, 0 if last else i + 1)
        head = self._take_descriptor()
        self.write_descriptor(self.desc, head, table, DESC_SIZE * len(buffers), VIRTQ_DESC_F_INDIRECT, 0)
        return self.publish(head)

    def publish(self, head: int) -> int:
        """Put `head` in the available ring and bump avail idx."""
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)
        return head

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, written length) entries the device added since the last call."""
        entries = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            entries.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return entries


class MmioDriver:
    """Drives a VirtioMmioTransport's registers like Linux's virtio_mmio.c."""

    def __init__(self, transport, memory, heap: BumpAllocator) -> None:
        self.transport, self.memory, self.heap = transport, memory, heap
        self.queues: list[DriverQueue] = []

    def read32(self, offset: int) -> int:
        """A register load: from the transport's mirror where it has one, as a guest's would be."""
        mirror = self.transport.mirror
        data = mirror.read(offset, 4) if mirror is not None else self.transport.read(offset, 4)
        return int.from_bytes(data, "little")

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def device_features(self) -> int:
        self.write32(mmio.REG_DEVICE_FEATURES_SEL, 1)
        high = self.read32(mmio.REG_DEVICE_FEATURES)
        self.write32(mmio.REG_DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read32(mmio.REG_DEVICE_FEATURES)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; True if accepted."""
        self.write32(mmio.REG_STATUS, 0)
        self.write32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE)
        self.write32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        wanted = self.device_features() if features is None else features
        for sel in (0, 1):
            self.write32(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.write32(mmio.REG_DRIVER_FEATURES, wanted >> (32 * sel))
        self.write32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER | mmio.STATUS_FEATURES_OK)
        return bool(self.read32(mmio.REG_STATUS) & mmio.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.write32(mmio.REG_QUEUE_SEL, index)
        size = size or self.read32(mmio.REG_QUEUE_NUM_MAX)
        queue = DriverQueue.create(self.memory, self.heap, size)
        self.write32(mmio.REG_QUEUE_NUM, size)
        for low, addr in ((mmio.REG_QUEUE_DESC_LOW, queue.desc), (mmio.REG_QUEUE_DRIVER_LOW, queue.avail),
                          (mmio.REG_QUEUE_DEVICE_LOW, queue.used)):
            self.write32(low, addr)
            self.write32(low + 4, addr >> 32)
        self.write32(mmio.REG_QUEUE_READY, 1)
        self.queues.append(queue)
        return queue

    def start(self, features: int | None = None, queue_size: int | None = None) -> list[DriverQueue]:
        """The whole of 3.1.1: negotiate, set up every queue, DRIVER_OK."""
        if not self.negotiate(features):
            raise RuntimeError("device refused the features")
        num_queues = self.transport.num_queues
        self.queues = []
        for index in range(num_queues):
            self.setup_queue(index, queue_size)
        self.write32(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER
                     | mmio.STATUS_FEATURES_OK | mmio.STATUS_DRIVER_OK)
        return self.queues

    def kick(self, index: int) -> None:
        self.write32(mmio.REG_QUEUE_NOTIFY, index)

    def ack_interrupts(self) -> int:
        status = self.read32(mmio.REG_INTERRUPT_STATUS)
        self.write32(mmio.REG_INTERRUPT_ACK, status)
        return status

    def buffer(self, data: bytes | int, write: bool = False) -> Buffer:
        """Allocate a buffer holding `data` (or `data` zero bytes)."""
        length = data if isinstance(data, int) else len(data)
        gpa = self.heap.alloc(max(length, 1), 8)
        if not isinstance(data, int):
            self.memory.write(gpa, data)
        return Buffer(gpa, length, write)

