"""What every VirtIO device offers its transport (VIRTIO 1.2 sections 2 and 6).

A device has an ID (5), feature bits (2.2, 6), queue sizes, a config space
(2.5) and a queue handler; the transport does negotiation, status and
interrupts and hands the device its activated queues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import msgspec

from ember.devices.ratelimit import RateLimiter
from ember.devices.virtio.queue import DescriptorChain, Virtqueue

log = logging.getLogger(__name__)

# Reserved feature bits (6) the transport and queue implement for every device.
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

# Device IDs (5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19

CONFIG_ACCESS_SIZES = (1, 2, 4, 8)


class DeviceState(msgspec.Struct):
    """A device's own saved state beyond its queues (none by default)."""

    acked_features: int = 0


class VirtioDevice:
    """Base class: subclasses set device_id and features and handle queues."""

    device_id: int = 0

    def __init__(self, queue_max_sizes: Sequence[int], features: int) -> None:
        self.queue_max_sizes = tuple(queue_max_sizes)
        self.features = features | VIRTIO_F_VERSION_1
        self.acked_features = 0
        self.queues: list[Virtqueue] = []
        self._signal_used: Callable[[int], None] = lambda index: None
        self._kick: Callable[[int], None] = lambda index: None
        self.limiters: dict[int, RateLimiter] = {}  # by queue index
        self._timers = None  # the event loop that brings a throttled queue back
        self._retry_due: set[int] = set()
        self.throttled_events: dict[int, int] = {}  # by queue index: requests a limiter held back

    # -- transport hooks ----------------------------------------------------
    def bind(self, signal_used: Callable[[int], None], kick: Callable[[int], None]) -> None:
        """The transport's callbacks, both taking a queue index: `signal_used` after
        pushing used buffers; `kick` to process a queue from the host side (backend
        input), with the same locking and failure handling as a guest notify."""
        self._signal_used = signal_used
        self._kick = kick

    def signal_used(self, index: int) -> None:
        self._signal_used(index)

    def kick(self, index: int) -> None:
        self._kick(index)

    def activate(self, queues: list[Virtqueue], acked_features: int) -> None:
        """The driver set DRIVER_OK: start serving `queues`."""
        self.queues = queues
        self.acked_features = acked_features

    def reset(self) -> None:
        """The driver wrote 0 to Status: drop every reference to the queues."""
        self.queues = []
        self.acked_features = 0

    def close(self) -> None:
        """Release the backend (files, sockets); the device is not used again."""

    def process_queue(self, index: int) -> None:
        """The driver notified queue `index`; may raise VirtqueueError."""
        raise NotImplementedError

    def consume_chains(self, index: int, handle: Callable[[DescriptorChain], None], *,
                       budget: int | None = None, loop=None) -> None:
        """Serve a queue whose buffers the device only reads: ``handle`` each chain, return it
        with used length 0, and signal once for the lot (even when ``handle`` raises part way).

        With a ``budget``, stop after that many chains and come back through ``loop`` once other
        events had a turn, so one busy queue cannot starve the event loop. A rate-limited queue
        stops at the first chain its limiter holds back (its bytes: what the device reads).
        """
        queue, done = self.queues[index], 0
        try:
            while (budget is None or done < budget) and (chain := queue.pop()) is not None:
                if index in self.limiters and self.throttle(index, chain.readable_len):
                    queue.undo_pop(1)
                    break
                handle(chain)
                queue.push_used(chain.head, 0)
                done += 1
        finally:
            if done:
                self.signal_used(index)
        if done == budget:  # more may wait
            loop.call_soon_threadsafe(lambda: self.kick(index))

    # -- rate limiting -------------------------------------------------------------
    def set_rate_limiter(self, index: int, limiter: RateLimiter | None, loop) -> None:
        """Limit queue ``index`` (None lifts the limit); ``loop`` runs the retries.
        A queue waiting on the old limiter is served again at once."""
        if limiter is None:
            self.limiters.pop(index, None)
        else:
            self.limiters[index] = limiter
        self._timers = loop
        if index in self._retry_due:
            loop.call_soon_threadsafe(lambda: self._retry(index))

    def throttle(self, index: int, nbytes: int) -> bool:
        """Whether queue ``index``'s next request, of ``nbytes`` bytes, must wait; if so a
        retry is scheduled and the caller leaves the request queued (undo_pop)."""
        limiter = self.limiters.get(index)
        if limiter is None:
            return False
        wait = limiter.admit(nbytes)
        if not wait:
            return False
        self.throttled_events[index] = self.throttled_events.get(index, 0) + 1
        if index not in self._retry_due:
            self._retry_due.add(index)
            self._timers.call_later(wait, lambda: self._retry(index))
        return True

    def _retry(self, index: int) -> None:
        if index in self._retry_due:
            self._retry_due.discard(index)
            self.kick(index)

    # -- metrics -------------------------------------------------------------------
    def metrics(self) -> dict[str, int]:
        """Counters since the device was made, under Firecracker's metric names."""
        return {}

    # -- config space ---------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device-specific config layout (little-endian)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """Bounds-checked config read: out-of-range or odd sizes read as zeros."""
        config = self.config_bytes()
        if size not in CONFIG_ACCESS_SIZES or offset < 0 or offset + size > len(config):
            return bytes(size)
        return config[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Config writes are ignored unless a device has writable fields."""
        log.debug("%s: ignored config write at %#x", type(self).__name__, offset)

    # -- snapshots --------------------------------------------------------------
    def save_state(self) -> DeviceState:
        return DeviceState(acked_features=self.acked_features)

    def restore_state(self, state: DeviceState) -> None:
        self.acked_features = state.acked_features
