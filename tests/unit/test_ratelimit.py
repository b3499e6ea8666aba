"""Token buckets and device rate limiting (Firecracker's rate limiter semantics), on a fake clock."""

from __future__ import annotations

import struct

import pytest

from ember import config as cfg
from ember.devices import ratelimit
from ember.devices.ratelimit import RateLimiter, TokenBucket
from ember.devices.virtio import mmio
from ember.devices.virtio.block import VIRTIO_BLK_T_IN, BlockDevice
from ember.devices.virtio.rng import RngDevice
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.memory import GuestMemory
from tests.fakes import RecordingIrq

RAM = 4 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """The event loop's call_later, run by hand."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.due = clock, []

    def call_later(self, delay, callback):
        self.due.append((self.clock.now + delay, callback))

    def call_soon_threadsafe(self, callback):
        self.due.append((self.clock.now, callback))

    def run_until(self, when: float) -> None:
        self.clock.now = when
        ready = [c for t, c in self.due if t <= when]
        self.due = [(t, c) for t, c in self.due if t > when]
        for callback in ready:
            callback()


def test_a_bucket_starts_full_and_refills_at_size_per_refill_time():
    clock = Clock()
    bucket = TokenBucket(1000, 500, clock=clock)  # 2000 tokens/s
    assert bucket.wait_for(1000) == 0
    bucket.take(1000)
    assert bucket.wait_for(1) == pytest.approx(0.0005)
    assert bucket.wait_for(400) == pytest.approx(0.2)
    clock.now += 0.1
    assert bucket.wait_for(200) == 0 and bucket.wait_for(201) > 0
    clock.now += 10
    assert bucket.wait_for(1000) == 0 and bucket.wait_for(1001) == 0  # never above size; more waits for full


def test_one_time_burst_is_spent_first_and_never_refilled():
    clock = Clock()
    bucket = TokenBucket(100, 1000, one_time_burst=50, clock=clock)
    bucket.take(120)  # 50 from the burst, 70 from the bucket
    assert bucket.burst == 0 and bucket.budget == pytest.approx(30)
    clock.now += 100
    assert bucket.budget <= 100 and bucket.wait_for(100) == 0 and bucket.burst == 0


def test_an_oversized_request_passes_when_the_bucket_is_full_and_leaves_a_debt():
    clock = Clock()
    bucket = TokenBucket(100, 1000, clock=clock)  # 100 tokens/s
    assert bucket.wait_for(250) == 0  # full: it may go
    bucket.take(250)
    assert bucket.budget == pytest.approx(-150)
    assert bucket.wait_for(1) == pytest.approx(1.51)  # the debt is paid back first


def test_a_limiter_takes_from_both_buckets_or_neither():
    clock = Clock()
    limiter = RateLimiter(TokenBucket(1000, 1000, clock=clock), TokenBucket(2, 1000, clock=clock))
    assert limiter.admit(600) == 0
    wait = limiter.admit(600)  # ops has 1 left, bandwidth only 400 bytes
    assert wait == pytest.approx(0.2)
    assert limiter.ops.budget == pytest.approx(1)  # the refused request took no op
    clock.now += 0.2
    assert limiter.admit(600) == 0
    assert limiter.admit(0) > 0  # no op left: even an empty request waits


def test_zero_sized_or_missing_buckets_limit_nothing():
    assert ratelimit.from_config(None) is None
    assert ratelimit.from_config(cfg.RateLimiter()) is None
    zero = cfg.RateLimiter(bandwidth=cfg.TokenBucket(size=0, refill_time=100),
                           ops=cfg.TokenBucket(size=10, refill_time=0))
    assert ratelimit.from_config(zero) is None
    some = ratelimit.from_config(cfg.RateLimiter(ops=cfg.TokenBucket(size=10, refill_time=100)))
    assert some.bandwidth is None and some.ops.size == 10


def read_request(driver, queue, heap, length):
    header = driver.buffer(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    data = driver.buffer(length, write=True)
    status = driver.buffer(1, write=True)
    return queue.add_chain([header, data, status])


def test_a_limited_disk_serves_what_the_bucket_allows_and_the_rest_when_it_refills(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 << 10))
    memory, clock = GuestMemory([(0, RAM)]), Clock()
    timers = Timers(clock)
    device = BlockDevice(str(image))
    transport = mmio.VirtioMmioTransport(device, memory, RecordingIrq())
    try:
        driver = MmioDriver(transport, memory, BumpAllocator(0x1000, RAM))
        (queue,) = driver.start()
        device.set_rate_limiter(0, RateLimiter(TokenBucket(8192, 1000, clock=clock)), timers)  # 8 KiB/s
        heads = [read_request(driver, queue, driver.heap, 4096) for _ in range(3)]
        driver.kick(0)
        assert [h for h, _ in queue.take_used()] == heads[:2]  # 8 KiB went; the third waits
        [(due, _)] = timers.due
        assert due - clock.now == pytest.approx(0.5)
        driver.kick(0)  # the guest kicking again changes nothing, and schedules no second retry
        assert queue.take_used() == [] and len(timers.due) == 1
        timers.run_until(due)
        assert [h for h, _ in queue.take_used()] == heads[2:]
        device.set_rate_limiter(0, None, timers)  # lifted: everything goes at once
        more = [read_request(driver, queue, driver.heap, 4096) for _ in range(4)]
        driver.kick(0)
        assert [h for h, _ in queue.take_used()] == more
    finally:
        transport.close()
        memory.close()


def test_a_limited_entropy_device_paces_its_bytes():
    memory, clock = GuestMemory([(0, RAM)]), Clock()
    timers = Timers(clock)
    device = RngDevice()
    transport = mmio.VirtioMmioTransport(device, memory, RecordingIrq())
    try:
        driver = MmioDriver(transport, memory, BumpAllocator(0x1000, RAM))
        (queue,) = driver.start()
        device.set_rate_limiter(0, RateLimiter(TokenBucket(64, 1000, clock=clock)), timers)
        first = queue.add_chain([driver.buffer(64, write=True)])
        second = queue.add_chain([driver.buffer(64, write=True)])
        driver.kick(0)
        assert queue.take_used() == [(first, 64)]
        timers.run_until(clock.now + 1.0)
        assert queue.take_used() == [(second, 64)]
    finally:
        transport.close()
        memory.close()
