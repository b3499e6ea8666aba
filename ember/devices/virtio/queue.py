"""The device side of a split virtqueue (VIRTIO 1.2 section 2.7).

Reads descriptor chains (direct and indirect, 2.7.5) from the driver's
available ring, publishes used elements (2.7.8) and decides when the driver
wants an interrupt (VIRTIO_F_EVENT_IDX, 2.7.7 and 2.7.10). Every index, address
and length the guest wrote is checked; a bad chain raises VirtqueueError.

The driver reads the ring's indices while the device writes them, so each is
read and written in one 16-bit access, through memoryviews cast to u16 (and
the used elements to u32). struct.pack_into must not touch them: it zeroes its
field before writing it byte by byte, and a driver that reads the used index
in between sees it at 0, takes stale ring slots for completions, and stops
the queue ("id N is not a head!").
"""

from __future__ import annotations

import array
import functools
import logging
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from ember.devices.virtio import iovec
from ember.memory import GuestMemoryError, MemoryRegion

log = logging.getLogger(__name__)

DESC_SIZE = 16
DESC_FORMAT = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_ADDR = struct.Struct("<Q")
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
RING_HEADER_SIZE = 4  # flags, idx
USED_ELEM = struct.Struct("<II")  # id, len
USED_ELEM_WORDS = USED_ELEM.size // 4
# Ring fields as u16 indices into the rings cast to "H" (VIRTIO 1.2 2.7.6, 2.7.8).
AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING = 0, 1, 2  # the driver's used_event follows the ring
USED_IDX = 1  # the device's avail_event follows the used elements
assert sys.byteorder == "little", "virtqueue fields are little-endian and accessed in host order"

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768  # 2.7: split queue sizes are powers of 2 up to 32768
IDX_MASK = 0xFFFF

# A full memory barrier: taking a lock is an atomic read-modify-write, which
# orders our used-ring stores before the loads of the driver's event index.
_BARRIER_LOCK = threading.Lock()


def memory_barrier() -> None:
    """Order earlier guest-memory stores before later loads (x86 mfence-like)."""
    with _BARRIER_LOCK:
        pass


class VirtqueueError(Exception):
    """The driver put something malformed on a queue; the device must stop."""


class QueueState(msgspec.Struct):
    """What the transport and device know of one queue; saved in snapshots."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0
    next_avail: int = 0
    next_used: int = 0
    signalled_used: int = 0


@dataclass(slots=True)
class GuestSpans:
    """A chain's buffers as the kernel's iovec array, all inside one RAM region.

    ``iov`` holds (host address, length) for each buffer; the first
    ``readable`` are device-readable, the rest device-writable. A device that
    moves bulk data (virtio-blk) hands it straight to preadv/pwritev, without a
    memoryview per buffer.
    """

    region: MemoryRegion
    iov: array.array
    readable: int
    inner_bytes: int | None = None  # the inner buffers' total when already known (CheckedInner)

    @property
    def count(self) -> int:
        return len(self.iov) // 2

    def lengths(self, first: int = 0, stop: int | None = None) -> array.array:
        stop = self.count if stop is None else stop
        return self.iov[2 * first + 1:2 * stop:2]

    def inner_length(self) -> int:
        """Bytes in every buffer but the first and the last: a request's data between
        its header and its status."""
        if self.inner_bytes is None:
            return sum(self.lengths(1, self.count - 1))
        return self.inner_bytes

    def offset(self, index: int) -> int:
        """Where buffer ``index`` starts in the region's view."""
        return self.iov[2 * index] - self.region.host_addr

    def views(self) -> list[memoryview]:
        ram, host, iov = self.region.view, self.region.host_addr, self.iov
        return [ram[iov[i] - host:iov[i] - host + iov[i + 1]] for i in range(0, len(iov), 2)]


@dataclass(frozen=True, slots=True)
class CheckedInner:
    """The inner entries (all but the first and last) of the last indirect table
    that passed the whole-table checks, and what those checks found.

    Linux's virtio-blk puts each request's header and status, whose addresses
    follow the request's tag, at the two ends of the table and the data pages
    between them; an application that reuses its buffer (dd, a database's
    O_DIRECT pool) repeats the inner entries byte for byte. A table whose inner
    bytes are these again needs only its two ends checked (Virtqueue.pop).
    """

    entries: bytes  # as the guest wrote them
    region: MemoryRegion  # holds every inner buffer
    iov: array.array  # the whole table's iovecs; a request copies it and fills in its two ends
    readable: int  # how many inner entries are device-readable (they come first)
    length: int  # the inner buffers' bytes together
    table_bytes: int  # the table's size: inner entries plus the two ends


class DescriptorChain:
    """One request: the guest buffers the device may read, then write.

    ``readable`` and ``writable`` are lists of memoryviews. A chain parsed in
    the common Linux layout also carries ``spans`` and makes those lists only
    when a device first asks for them.
    """

    __slots__ = ("head", "spans", "_readable", "_writable")

    def __init__(self, head: int, spans: GuestSpans | None = None) -> None:
        self.head, self.spans = head, spans
        empty = spans is None  # the walker fills the lists; spans make them on demand
        self._readable: list[memoryview] | None = [] if empty else None
        self._writable: list[memoryview] | None = [] if empty else None

    def _materialize(self) -> None:
        views = self.spans.views()
        self._readable, self._writable = views[:self.spans.readable], views[self.spans.readable:]

    @property
    def readable(self) -> list[memoryview]:
        if self._readable is None:
            self._materialize()
        return self._readable

    @readable.setter
    def readable(self, views: list[memoryview]) -> None:
        self._readable = views

    @property
    def writable(self) -> list[memoryview]:
        if self._writable is None:
            self._materialize()
        return self._writable

    @writable.setter
    def writable(self, views: list[memoryview]) -> None:
        self._writable = views

    @property
    def readable_len(self) -> int:
        if self._readable is None:
            return sum(self.spans.lengths(0, self.spans.readable))
        return sum(len(v) for v in self._readable)

    @property
    def writable_len(self) -> int:
        if self._writable is None:
            return sum(self.spans.lengths(self.spans.readable))
        return sum(len(v) for v in self._writable)

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable_len} B, writable={self.writable_len} B)"


_LINKED_WRITE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE


# Where the fast parser finds columns in a table of 16-byte descriptors (addr, len, flags, next).
_FLAGS_LOW, _FLAGS_HIGH = 12, 13  # byte offsets of the flags' two bytes
DESC_HALVES = DESC_SIZE // 2
_NEXT_HALF = 7  # u16 index of next


@functools.lru_cache(maxsize=64)
def _successors(count: int) -> memoryview:
    """1, 2, ..., count - 1 as u16s: the next fields of a table linked in order."""
    return memoryview(array.array("H", range(1, count)))


def _read_then_write(readable: int, writable: int) -> bytes:
    """The low flag bytes of linked entries, readable ones first."""
    return bytes((VIRTQ_DESC_F_NEXT,)) * readable + bytes((_LINKED_WRITE,)) * writable


def _ends_around(ram: memoryview, start: int, known: CheckedInner) -> GuestSpans | None:
    """The spans of the indirect table at ``ram[start:]`` whose inner entries are
    ``known``'s: its first and last entry are read once and checked by the rules
    _linear_indirect applies to all; None if either fails."""
    first_addr, first_len, first_flags, first_next = DESC_FORMAT.unpack_from(ram, start)
    last_addr, last_len, last_flags, _ = DESC_FORMAT.unpack_from(ram, start + known.table_bytes - DESC_SIZE)
    if first_next != 1 or not first_len or not last_len:
        return None
    if first_flags == VIRTQ_DESC_F_NEXT:
        readable = 1 + known.readable
    elif first_flags == _LINKED_WRITE and not known.readable:
        readable = 0  # a writable first entry: every linked one must be writable
    else:
        return None
    count = known.table_bytes // DESC_SIZE
    if last_flags == 0 and readable == count - 1:
        readable = count  # a readable last entry: every entry is readable
    elif last_flags != VIRTQ_DESC_F_WRITE:
        return None
    region = known.region
    if not (region.holds(first_addr, first_len) and region.holds(last_addr, last_len)):
        return None
    base = region.host_addr - region.gpa
    iov = known.iov[:]
    iov[0], iov[1], iov[-2], iov[-1] = base + first_addr, first_len, base + last_addr, last_len
    return GuestSpans(region, iov, readable, known.length)


class _ChainWalker:
    """Follows one descriptor chain, counting every descriptor it visits.

    Buffers that continue each other in guest-physical memory (a driver's
    page-sized segments often do) are merged into one view, so a 1 MiB request
    costs a few views and iovecs rather than 256.
    """

    def __init__(self, queue: Virtqueue, head: int) -> None:
        self.queue = queue
        self.chain = DescriptorChain(head)
        self.budget = queue.size  # a chain never has more descriptors than the queue
        self._run_addr = self._run_len = 0
        self._run_write = False

    def walk(self) -> DescriptorChain:
        table, count, index = self.queue.desc_table, self.queue.size, self.chain.head
        entries: list[tuple[int, int, int, int]] | None = None  # an indirect table, unpacked at once
        while True:
            if entries is None:
                addr, length, flags, nxt = self._descriptor(table, count, index)
            else:
                addr, length, flags, nxt = self._indirect_entry(entries, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if entries is not None:
                    raise VirtqueueError("nested indirect descriptor")
                raw = self._indirect_table(addr, length, flags)
                if not self.chain.readable and not self.chain.writable and not self._run_len:
                    fast = self._linear_indirect(raw)
                    if fast is not None:
                        return fast
                    return self._walk_indirect(list(DESC_FORMAT.iter_unpack(raw)))
                entries = list(DESC_FORMAT.iter_unpack(raw))
                index = 0
                continue
            self._add_buffer(addr, length, flags)
            if not flags & VIRTQ_DESC_F_NEXT:
                self._flush()
                return self.chain
            index = nxt

    def _walk_indirect(self, entries: list[tuple[int, int, int, int]]) -> DescriptorChain:
        """The common case, a chain that is one indirect table: the same rules in one tight loop."""
        run_addr = run_len = 0
        run_write = seen_write = False
        index, budget, count = 0, len(entries), len(entries)
        while True:
            if index >= count:
                raise VirtqueueError(f"descriptor index {index} outside a table of {count}")
            budget -= 1
            if budget < 0:
                raise VirtqueueError("descriptor chain longer than the queue (a loop?)")
            addr, length, flags, nxt = entries[index]
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError("nested indirect descriptor")
            write = bool(flags & VIRTQ_DESC_F_WRITE)
            if write:
                seen_write = True
            elif seen_write:
                raise VirtqueueError("readable descriptor after a writable one")
            if length:
                if run_len and write == run_write and addr == run_addr + run_len:
                    run_len += length
                else:
                    if run_len:
                        self._emit(run_addr, run_len, run_write)
                    run_addr, run_len, run_write = addr, length, write
            if not flags & VIRTQ_DESC_F_NEXT:
                if run_len:
                    self._emit(run_addr, run_len, run_write)
                return self.chain
            index = nxt

    def _emit(self, addr: int, length: int, write: bool) -> None:
        view = self.queue.guest_view(addr, length)
        (self.chain.writable if write else self.chain.readable).append(view)

    def _descriptor(self, table: memoryview, count: int, index: int) -> tuple[int, int, int, int]:
        if index >= count:
            raise VirtqueueError(f"descriptor index {index} outside a table of {count}")
        self.budget -= 1
        if self.budget < 0:
            raise VirtqueueError("descriptor chain longer than the queue (a loop?)")
        return DESC_FORMAT.unpack_from(table, index * DESC_SIZE)

    def _indirect_entry(self, entries: list, index: int) -> tuple[int, int, int, int]:
        if index >= len(entries):
            raise VirtqueueError(f"descriptor index {index} outside a table of {len(entries)}")
        self.budget -= 1
        if self.budget < 0:
            raise VirtqueueError("descriptor chain longer than the queue (a loop?)")
        return entries[index]

    def _linear_indirect(self, raw: bytes) -> DescriptorChain | None:
        """The layout Linux always writes, checked and mapped with whole-table operations.

        Entry i links to i + 1 and only the last ends the chain; readable
        entries come first, none is empty or indirect. Columns are sliced out
        of the table at C speed instead of walking it entry by entry, which a
        1 MiB request (256 page-sized entries) would make the costliest step.
        The table's inner entries are remembered (CheckedInner), so a table
        that repeats them needs only its two ends checked (Virtqueue.pop).
        None means the table is laid out some other (legal) way: walk it.
        """
        count = len(raw) // DESC_SIZE
        if raw[_FLAGS_HIGH::DESC_SIZE].count(0) != count:
            return None  # a flag outside NEXT and WRITE (INDIRECT is in the low byte)
        if memoryview(raw).cast("H")[_NEXT_HALF::DESC_HALVES][:-1] != _successors(count):
            return None
        flags = raw[_FLAGS_LOW::DESC_SIZE]  # one byte per entry
        last = flags[-1]
        readable = flags.count(VIRTQ_DESC_F_NEXT, 0, count - 1)
        if last & ~VIRTQ_DESC_F_WRITE or flags[:-1] != _read_then_write(readable, count - 1 - readable):
            return None  # linked entries must be all readable, then all writable
        if not last:
            if readable != count - 1:
                return None  # a readable entry after a writable one
            readable = count
        if 0 in memoryview(raw).cast("I")[2::4]:
            return None  # empty buffers: the walker drops them
        spans = self._spans_in_one_region(raw, readable)
        if spans is not None:  # checked once for all; views are made only if a device asks
            if count > 2:
                inner_readable = flags.count(VIRTQ_DESC_F_NEXT, 1, count - 1)
                self.queue.checked_inner = CheckedInner(raw[DESC_SIZE:-DESC_SIZE], spans.region, spans.iov[:],
                                                        inner_readable, sum(spans.iov[3:-2:2]), len(raw))
            return DescriptorChain(self.chain.head, spans=spans)
        starts, lengths = memoryview(raw).cast("Q")[0::2], memoryview(raw).cast("I")[2::4]
        views = [self.queue.guest_view(start, length) for start, length in zip(starts, lengths)]
        self.chain.readable, self.chain.writable = views[:readable], views[readable:]
        return self.chain

    def _spans_in_one_region(self, raw: bytes, readable: int) -> GuestSpans | None:
        """The table as an iovec array if the RAM region of its first buffer holds every
        buffer; None otherwise (each buffer is then checked alone)."""
        try:
            region = self.queue.memory.find_region(DESC_ADDR.unpack_from(raw)[0])
        except GuestMemoryError:
            return None
        iov = iovec.from_descriptors(raw, region.gpa, region.size, region.host_addr)
        return None if iov is None else GuestSpans(region, iov, readable)

    def _indirect_table(self, addr: int, length: int, flags: int) -> bytes:
        """A private copy of an indirect table, so the guest cannot change it under the walk."""
        if not self.queue.indirect_enabled:
            raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
        if flags & VIRTQ_DESC_F_NEXT:
            raise VirtqueueError("indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise VirtqueueError(f"indirect table length {length} not a multiple of {DESC_SIZE}")
        count = length // DESC_SIZE
        if count > self.queue.size:
            raise VirtqueueError(f"indirect table of {count} entries exceeds the queue size")
        self.budget = count  # the descriptors inside bound the rest of the walk
        return bytes(self.queue.guest_view(addr, length))

    def _add_buffer(self, addr: int, length: int, flags: int) -> None:
        write = bool(flags & VIRTQ_DESC_F_WRITE)
        if not write and (self.chain.writable or self._run_write and self._run_len):
            raise VirtqueueError("readable descriptor after a writable one")
        if not length:
            return
        if self._run_len and write == self._run_write and addr == self._run_addr + self._run_len:
            self._run_len += length  # continues the previous buffer
            return
        self._flush()
        self._run_addr, self._run_len, self._run_write = addr, length, write

    def _flush(self) -> None:
        if self._run_len:
            self._emit(self._run_addr, self._run_len, self._run_write)
            self._run_len = 0


class Virtqueue:
    """A split virtqueue in guest memory, driven from the device side."""

    def __init__(self, memory, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.state = QueueState(max_size=max_size)
        self.event_idx = False
        self.indirect_enabled = False
        self._release_views()

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def active(self) -> bool:
        return self.desc_table is not None

    def describe(self) -> str:
        """Both sides' indices, for a report on a stuck queue: the driver's avail idx
        past next_avail is work the device has not taken; used idx past the
        driver's used_event is completions it was told of."""
        s = self.state
        if not self.active:
            return f"size {s.size}, not active"
        text = (f"size {s.size}: avail idx {self._avail_idx()} (device at {s.next_avail}), "
                f"used idx {self._used_words[USED_IDX]} (device at {s.next_used}, "
                f"last signalled at {s.signalled_used})")
        if self.event_idx:
            avail_event = self._used_words[self._avail_event_at]
            text += f", used_event {self._used_event()}, avail_event {avail_event}"
        else:
            text += f", avail flags {self._avail_words[AVAIL_FLAGS]:#x}"
        return text

    def guest_view(self, addr: int, length: int) -> memoryview:
        """A bounds-checked view of guest memory; bad ranges are a VirtqueueError."""
        try:
            return self.memory.view(addr, length)
        except GuestMemoryError as exc:
            raise VirtqueueError(f"buffer {addr:#x}+{length:#x} outside guest memory: {exc}") from None

    def activate(self, *, event_idx: bool, indirect: bool) -> None:
        """Check the driver's ring set-up and map the three rings (2.7)."""
        size = self.state.size
        if not 0 < size <= self.state.max_size or size & (size - 1):
            raise VirtqueueError(f"queue size {size} invalid (max {self.state.max_size}, power of 2)")
        self._check_alignment()
        self.event_idx, self.indirect_enabled = event_idx, indirect
        self.desc_table = self.guest_view(self.state.desc_addr, DESC_SIZE * size)
        self.avail = self.guest_view(self.state.driver_addr, RING_HEADER_SIZE + 2 * size + 2)
        self.used = self.guest_view(self.state.device_addr, RING_HEADER_SIZE + USED_ELEM.size * size + 2)
        self._avail_words = self.avail.cast("H")
        self._used_words = self.used.cast("H")
        self._used_elems = self.used[RING_HEADER_SIZE:RING_HEADER_SIZE + USED_ELEM.size * size].cast("I")
        self._avail_event_at = self._avail_event_word()

    def _check_alignment(self) -> None:
        for name, addr, align in (("descriptor table", self.state.desc_addr, DESC_ALIGN),
                                  ("available ring", self.state.driver_addr, AVAIL_ALIGN),
                                  ("used ring", self.state.device_addr, USED_ALIGN)):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} not {align}-byte aligned")

    def deactivate(self) -> None:
        """The driver cleared QueueReady: stop using the rings, keep the set-up."""
        self._release_views()

    def reset(self) -> None:
        """Forget the driver's set-up (device reset, 2.4)."""
        self.state = QueueState(max_size=self.state.max_size)
        self.event_idx = self.indirect_enabled = False
        self._release_views()

    def _release_views(self) -> None:
        self.checked_inner: CheckedInner | None = None
        self.desc_table: memoryview | None = None
        self.avail: memoryview | None = None
        self.used: memoryview | None = None
        self._avail_words: memoryview | None = None
        self._used_words: memoryview | None = None
        self._used_elems: memoryview | None = None

    # -- available ring -------------------------------------------------
    def _avail_idx(self) -> int:
        return self._avail_words[AVAIL_IDX]

    def _avail_event_word(self) -> int:
        """Where avail_event sits: after the used ring's elements (2.7.8)."""
        return (RING_HEADER_SIZE + USED_ELEM.size * self.size) // 2

    def _used_event(self) -> int:
        """The driver's used_event: after the available ring's entries (2.7.6)."""
        return self._avail_words[AVAIL_RING + self.size]

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None when the ring is empty.

        Every request pays for this, so it reads the ring through locals; a
        chain that is one indirect table repeating the last checked table's
        inner entries (CheckedInner) is mapped without walking it.
        """
        avail = self._avail_words
        if avail is None:
            return None
        state = self.state
        next_avail, size = state.next_avail, state.size
        pending = (avail[AVAIL_IDX] - next_avail) & IDX_MASK
        if not pending:
            if not self.event_idx:
                return None
            self._used_words[self._avail_event_at] = next_avail  # ask for a kick on the next buffer,
            memory_barrier()  # then look again
            pending = (avail[AVAIL_IDX] - next_avail) & IDX_MASK
            if not pending:
                return None
        if pending > size:
            raise VirtqueueError(f"available index moved {pending} entries ahead of a {size}-entry queue")
        head = avail[AVAIL_RING + (next_avail & (size - 1))]
        state.next_avail = (next_avail + 1) & IDX_MASK
        if head >= size:
            raise VirtqueueError(f"available ring names descriptor {head} of {size}")
        known = self.checked_inner
        if known is not None and self.indirect_enabled:
            spans = self._known_indirect(head, known)
            if spans is not None:
                return DescriptorChain(head, spans)
        return _ChainWalker(self, head).walk()

    def _known_indirect(self, head: int, known: CheckedInner) -> GuestSpans | None:
        """The spans of chain ``head`` if it is one indirect table of ``known``'s size, in
        its region, repeating its inner entries; None sends the chain to the walker.

        The guest's table is read in place, not copied: each part is read once
        (the inner bytes, compared whole, and each end) and only what was read
        and checked is used, so a guest rewriting the table meanwhile gets a
        chain it could have written.
        """
        addr, length, flags, _ = DESC_FORMAT.unpack_from(self.desc_table, head * DESC_SIZE)
        if flags != VIRTQ_DESC_F_INDIRECT or length != known.table_bytes:
            return None
        region = known.region
        if not region.holds(addr, length):
            return None
        start, ram = addr - region.gpa, region.view
        if ram[start + DESC_SIZE:start + length - DESC_SIZE].tobytes() != known.entries:
            return None
        return _ends_around(ram, start, known)

    # -- used ring ------------------------------------------------------
    def undo_pop(self, count: int) -> None:
        """Give back the last ``count`` chains popped, unused: the next pops return them again."""
        self.state.next_avail = (self.state.next_avail - count) & 0xFFFF

    def push_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes filled in."""
        elems = self._used_elems
        if elems is None:
            return
        state = self.state
        index = state.next_used
        word = USED_ELEM_WORDS * (index & (state.size - 1))
        elems[word] = head
        elems[word + 1] = written
        state.next_used = index = (index + 1) & IDX_MASK
        self._publish_used_idx(index)

    def push_used_many(self, elements: Iterable[tuple[int, int]]) -> None:
        """Return several chains (head, bytes written) at once: every used element is in
        place before the used index moves past them all, so the driver sees all or none.
        A received packet spread over mergeable buffers needs this (VIRTIO 1.2 5.1.6.4.2:
        the device uses them together, so that at least num_buffers are seen as used)."""
        if not self.active:
            return
        size, elems, index = self.size, self._used_elems, self.state.next_used
        for head, written in elements:
            word = USED_ELEM_WORDS * (index % size)
            elems[word] = head
            elems[word + 1] = written
            index = (index + 1) & IDX_MASK
        self.state.next_used = index
        self._publish_used_idx(index)

    def _publish_used_idx(self, index: int) -> None:
        """One 16-bit store; x86 makes it visible after the element stores before it."""
        self._used_words[USED_IDX] = index

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        avail = self._avail_words
        if avail is None:
            return False
        state = self.state
        new, old = state.next_used, state.signalled_used
        state.signalled_used = new
        if new == old:
            return False
        memory_barrier()
        if self.event_idx:  # vring_need_event (2.7.10): did new move past used_event?
            used_event = avail[AVAIL_RING + state.size]
            return ((new - used_event - 1) & IDX_MASK) < ((new - old) & IDX_MASK)
        return not avail[AVAIL_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT
