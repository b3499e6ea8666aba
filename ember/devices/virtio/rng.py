"""virtio-rng, the entropy device (VIRTIO 1.2 section 5.4).

One request queue; the device fills each writable buffer the driver posts
with bytes from the host CSPRNG (os.urandom), at most REQUEST_CAP per request
so one greedy request cannot stall the event loop.
"""

from __future__ import annotations

import logging
import os

from ember.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from ember.devices.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256
REQUEST_CAP = 64 * 1024


class RngDevice(VirtioDevice):
    """An entropy source for the guest's hwrng (virtio_rng)."""

    device_id = VIRTIO_ID_RNG

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, request_cap: int = REQUEST_CAP) -> None:
        super().__init__([queue_size], 0)
        self.request_cap = request_cap
        self.bytes_served = 0

    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        pushed = False
        while (chain := queue.pop()) is not None:
            if self.limiters and self.throttle(index, min(chain.writable_len, self.request_cap)):
                queue.undo_pop(1)  # served when the limiter allows (device.py)
                break
            queue.push_used(chain.head, self._fill(chain))
            pushed = True
        if pushed:
            self.signal_used(index)

    def metrics(self) -> dict[str, int]:
        return {"entropy_bytes": self.bytes_served,
                "entropy_rate_limiter_throttled": self.throttled_events.get(0, 0)}

    def _fill(self, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers with random bytes, up to the cap."""
        budget = self.request_cap
        for view in chain.writable:
            n = min(len(view), budget)
            if n == 0:
                break
            view[:n] = os.urandom(n)
            budget -= n
        written = self.request_cap - budget
        self.bytes_served += written
        return written
