"""KVM's coalesced MMIO ring (KVM API: KVM_REGISTER_COALESCED_MMIO, KVM_CAP_COALESCED_MMIO).

Guest writes to a registered zone do not exit: KVM appends them to a ring in
one page of every vCPU's mapping (the page whose index the capability check
returns) and user space replays them, in order, before it handles the next
exit. The ring is the VM's, shared by all vCPUs, so draining takes a lock.
KVM reads ``first`` while it appends, so ``first`` is stored in one 32-bit
store (a u32 memoryview), never with struct.pack_into, which zeroes a field
before writing its bytes: a ring that looks emptied to slot 0 lets KVM write
over entries not yet replayed.
"""

from __future__ import annotations

import mmap
import struct
import threading
from typing import Callable

from ember.kvm.structs import PAGE_SIZE

RING_HEADER = struct.Struct("<II")  # first (next to read), last (next KVM writes)
FIRST, LAST = 0, 1  # the header's u32 words
RING_ENTRY = struct.Struct("<QII8s")  # phys_addr, len, pio, data
RING_ENTRIES = (PAGE_SIZE - RING_HEADER.size) // RING_ENTRY.size


class CoalescedMmioRing:
    """The ring page of one VM, mapped through one of its vCPU descriptors."""

    def __init__(self, vcpu_fd: int, page_index: int) -> None:
        self._page = mmap.mmap(vcpu_fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=page_index * PAGE_SIZE)
        self._header = memoryview(self._page)[:RING_HEADER.size].cast("I")
        self._lock = threading.Lock()

    def pending(self) -> bool:
        header = self._header
        try:
            return header[FIRST] != header[LAST]
        except ValueError:  # released: the VM is being torn down
            return False

    def drain(self, write: Callable[[int, bytes], None]) -> int:
        """Replay every queued write through ``write(phys_addr, data)``, oldest first; returns how many."""
        count = 0
        with self._lock:
            if self._page.closed:
                return 0
            header = self._header
            first, last = header[FIRST], header[LAST]
            while first != last and first < RING_ENTRIES:
                offset = RING_HEADER.size + first * RING_ENTRY.size
                addr, length, _pio, data = RING_ENTRY.unpack_from(self._page, offset)
                write(addr, data[:min(length, len(data))])
                first = (first + 1) % RING_ENTRIES
                header[FIRST] = first  # the slot is free for KVM again
                count += 1
        return count

    def close(self) -> None:
        with self._lock:
            self._header.release()
            self._page.close()
