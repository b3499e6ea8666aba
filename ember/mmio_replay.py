"""Replaying the guest's coalesced MMIO writes into the device model.

KVM queues guest writes to registered zones (virtio-mmio's InterruptACK) in
the coalesced ring instead of exiting (ember/kvm/coalesced.py). A vCPU replays
them before it handles its next exit; the event loop replays them when a queue
notification wakes it (right after the guest acknowledged the previous
interrupt) and before a transport raises an interrupt, so a late ACK never
clears a newer one. Draining holds the ring's lock, so every write is applied
once and in the guest's order, and the counters below change under that lock.
"""

from __future__ import annotations

import time
from collections import defaultdict

from ember.exitstats import ExitStat

PAGE_MASK = ~0xFFF


class CoalescedReplay:
    """One VM's ring, the MMIO bus its writes go to, and a count of them by device page."""

    def __init__(self, ring, mmio_bus) -> None:
        self.ring = ring
        self.bus = mmio_bus
        self.stats: dict[str, ExitStat] = defaultdict(ExitStat)
        self._labels: dict[int, str] = {}

    def pending(self) -> bool:
        return self.ring.pending()

    def replay(self) -> int:
        """Apply every queued write, oldest first; returns how many."""
        return self.ring.drain(self._write)

    def replay_if_pending(self) -> int:
        """replay(), after a lock-free look at the ring finds something to replay."""
        return self.ring.drain(self._write) if self.ring.pending() else 0

    def _write(self, addr: int, data: bytes) -> None:
        start = time.perf_counter_ns()
        self.bus.write(addr, data)
        page = addr & PAGE_MASK
        label = self._labels.get(page)
        if label is None:
            label = self._labels[page] = f"mmio:{page:#x}"
        self.stats[label].add(time.perf_counter_ns() - start)
