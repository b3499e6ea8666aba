"""Split virtqueue (VIRTIO 1.2 2.7): chain parsing, used ring, notification suppression, fuzzing."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.virtio.queue import (
    DESC_FORMAT,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
    _ChainWalker,
)
from ember.devices.virtio.testdriver import Buffer, BumpAllocator, DriverQueue
from ember.memory import GuestMemory
from tests.torn_stores import wrong_changes_seen

RAM = 1 << 20
QSIZE = 8


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


def make_queue(memory, size=QSIZE, *, event_idx=False, indirect=True):
    memory.write(0, bytes(0x10000))
    heap = BumpAllocator(0x1000, 0x10000)
    driver = DriverQueue.create(memory, heap, size)
    queue = Virtqueue(memory, size)
    queue.state.size = size
    queue.state.desc_addr, queue.state.driver_addr, queue.state.device_addr = driver.desc, driver.avail, driver.used
    queue.activate(event_idx=event_idx, indirect=indirect)
    return queue, driver, heap


def test_empty_queue_pops_nothing(memory):
    queue, _, _ = make_queue(memory)
    assert queue.pop() is None


def test_direct_chain_gives_readable_then_writable_views(memory):
    queue, driver, _ = make_queue(memory)
    memory.write(0x8000, b"hello")
    head = driver.add_chain([Buffer(0x8000, 5), Buffer(0x9000, 3, write=True)])
    chain = queue.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello"]
    assert chain.writable_len == 3
    chain.writable[0][:] = b"abc"  # zero copy: lands in guest memory
    assert memory.read(0x9000, 3) == b"abc"
    assert queue.pop() is None


def test_indirect_chain(memory):
    queue, driver, heap = make_queue(memory)
    memory.write(0x8000, b"xyz")
    driver.add_indirect([Buffer(0x8000, 3), Buffer(0x8100, 2), Buffer(0x9000, 4, write=True)], heap)
    chain = queue.pop()
    assert [bytes(v) for v in chain.readable] == [b"xyz", bytes(2)]
    assert chain.writable_len == 4


def test_large_indirect_request_maps_every_page(memory):
    """A large request as Linux's virtio-blk sends it: header, 254 scattered pages (seg_max), status byte."""
    queue, driver, heap = make_queue(memory, size=256)
    pages = [0x20000 + 0x1000 * ((i * 37) % 254) // 2 for i in range(254)]  # scattered half-pages
    for i, page in enumerate(pages):
        memory.write(page, bytes([i]) * 8)
    buffers = [Buffer(0x8000, 16)] + [Buffer(p, 0x800, write=True) for p in pages] + [Buffer(0x9000, 1, write=True)]
    driver.add_indirect(buffers, heap)
    chain = queue.pop()
    assert [len(v) for v in chain.readable] == [16]
    assert len(chain.writable) == 255 and chain.writable_len == 254 * 0x800 + 1
    assert [bytes(v[:8]) for v in chain.writable[:-1]] == [bytes([i]) * 8 for i in range(254)]


def _outcome(walk):
    try:
        chain = walk()
    except VirtqueueError:
        return "error"
    inner = None if chain.spans is None else chain.spans.inner_length()
    return b"".join(map(bytes, chain.readable)), [len(v) for v in chain.writable], inner


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.sampled_from([0x8000, 0x8800, 0x9000, RAM - 8, RAM + 0x1000]),
                                  st.sampled_from([0, 1, 8, 0x800, 0x10000]), st.booleans(),
                                  st.sampled_from([0, 0, 0, VIRTQ_DESC_F_INDIRECT, 0x100, 0x8000])),
                        min_size=1, max_size=16),
       permute=st.booleans())
def test_indirect_fast_path_agrees_with_the_walk(memory, entries, permute):
    """Whole-table parsing of an indirect table gives what the entry-by-entry walk gives, errors included."""
    queue, driver, heap = make_queue(memory, size=16)
    memory.write(0x8000, bytes(range(256)) * 8)
    order = [0] + list(range(1, len(entries)))[::-1] if permute else list(range(len(entries)))
    raw = bytearray(16 * len(entries))
    for position, slot in enumerate(order):  # the chain visits slots in `order`
        addr, length, write, stray = entries[position]  # stray: a hostile extra flag bit
        last = position == len(order) - 1
        flags = (VIRTQ_DESC_F_WRITE if write else 0) | (0 if last else VIRTQ_DESC_F_NEXT) | stray
        DESC_FORMAT.pack_into(raw, 16 * slot, addr, length, flags, 0 if last else order[position + 1])
    _post_table(memory, driver, heap, bytes(raw))
    fast = _outcome(queue.pop)
    reference = _outcome(lambda: _ChainWalker(queue, 0)._walk_indirect(list(DESC_FORMAT.iter_unpack(raw))))
    if fast != "error":
        fast = (fast[0], sum(fast[1]))
    if reference != "error":
        reference = (reference[0], sum(reference[1]))
    assert fast == reference


def _post_table(memory, driver, heap, raw: bytes) -> None:
    """Post one indirect descriptor naming a table of ``raw`` entries, as the guest wrote them."""
    table = heap.alloc(len(raw), 16)
    memory.write(table, raw)
    head = driver._take_descriptor()
    write_desc(memory, driver.desc, head, table, len(raw), VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(head)


def _table_of(memory, driver, head: int) -> bytes:
    """The indirect table that descriptor ``head`` names."""
    table, length, _, _ = DESC_FORMAT.unpack(memory.read(driver.desc + 16 * head, 16))
    return memory.read(table, length)


_NEXT_WRITE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
# Each end is mostly valid, so that a single hostile field (the one a broken check would let
# through) is drawn often: an address outside RAM, a zero length, a stray flag, a wrong next.
_END = st.tuples(st.sampled_from([0x8000, 0x8000, 0x8010, RAM - 8, RAM + 0x1000]),
                 st.sampled_from([1, 16, 16, 0, 0x10000]))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inner_writes=st.lists(st.booleans(), min_size=1, max_size=6).map(sorted),
       first=_END, first_flags=st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT, _NEXT_WRITE, _NEXT_WRITE,
                                                VIRTQ_DESC_F_WRITE, 0, VIRTQ_DESC_F_NEXT | 0x100,
                                                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT]),
       first_next=st.sampled_from([1, 1, 1, 0, 2]),
       last=_END, last_flags=st.sampled_from([VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE, 0, 0, _NEXT_WRITE,
                                              VIRTQ_DESC_F_WRITE | 0x8000, VIRTQ_DESC_F_INDIRECT]))
def test_a_table_with_known_inner_entries_is_judged_as_if_new(memory, inner_writes, first, first_flags, first_next,
                                                             last, last_flags):
    """After a valid table, one with the same inner entries and hostile ends (only those are
    checked again) parses exactly as it does on a queue that never saw the first."""
    queue, driver, heap = make_queue(memory, size=16)
    inner = [Buffer(0x9000 + 0x1000 * i, 0x800, write) for i, write in enumerate(inner_writes)]
    head = driver.add_indirect([Buffer(0x8000, 16), *inner, Buffer(0xA000, 1, write=True)], heap)
    assert queue.pop() is not None and queue.checked_inner is not None
    raw = bytearray(_table_of(memory, driver, head))
    DESC_FORMAT.pack_into(raw, 0, *first, first_flags, first_next)
    DESC_FORMAT.pack_into(raw, len(raw) - 16, *last, last_flags, 0)
    _post_table(memory, driver, heap, bytes(raw))
    _post_table(memory, driver, heap, bytes(raw))
    known = _outcome(queue.pop)
    queue.checked_inner = None  # the second copy gets every check
    assert known == _outcome(queue.pop)


def test_known_inner_entries_still_map_the_new_header_and_status(memory):
    """Requests reusing one data buffer (as dd does) with headers and status bytes elsewhere each time."""
    queue, driver, heap = make_queue(memory, size=16)
    pages = [Buffer(0x9000 + 0x2000 * i, 0x1000, write=True) for i in range(4)]
    for request in range(3):
        header, status = 0x8000 + 0x40 * request, 0x8800 + 0x40 * request
        memory.write(header, bytes([request]) * 16)
        driver.add_indirect([Buffer(header, 16), *pages, Buffer(status, 1, write=True)], heap)
        chain = queue.pop()
        assert [bytes(v) for v in chain.readable] == [bytes([request]) * 16]
        assert [len(v) for v in chain.writable] == [0x1000] * 4 + [1]
        chain.writable[-1][0] = 0x55
        assert memory.read(status, 1) == b"\x55"
        assert chain.spans.inner_length() == 0x4000  # from the known entries after the first
        assert (chain.spans.inner_bytes is None) == (request == 0)
    assert queue.checked_inner is not None


@pytest.mark.parametrize("change", ["NEXT on the indirect descriptor", "a longer table", "table outside RAM"])
def test_a_table_like_the_known_one_but_posted_differently_gets_every_check(memory, change):
    """Only a lone indirect descriptor naming a table of the known size inside the known
    region takes the shortcut; anything else is walked, and judged, as a new table."""
    queue, driver, heap = make_queue(memory, size=16)
    buffers = [Buffer(0x8000, 16), Buffer(0x9000, 0x1000, write=True), Buffer(0x8800, 1, write=True)]
    head = driver.add_indirect(buffers, heap)
    assert queue.pop() is not None and queue.checked_inner is not None
    raw = _table_of(memory, driver, head)
    if change == "a longer table":
        raw = raw[:-16] + DESC_FORMAT.pack(0xA000, 8, _NEXT_WRITE, 3) + raw[-16:]
        _post_table(memory, driver, heap, raw)
        chain = queue.pop()
        assert [len(v) for v in chain.writable] == [0x1000, 8, 1]
        return
    table = heap.alloc(len(raw), 16)
    memory.write(table, raw)
    head = driver._take_descriptor()
    if change == "NEXT on the indirect descriptor":
        write_desc(memory, driver.desc, head, table, len(raw), VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 0)
    else:
        write_desc(memory, driver.desc, head, RAM - 16, len(raw), VIRTQ_DESC_F_INDIRECT, 0)
    driver.publish(head)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_a_known_table_is_read_once_the_guest_cannot_change_the_chain_after_pop(memory):
    queue, driver, heap = make_queue(memory, size=16)
    buffers = [Buffer(0x8000, 16), Buffer(0x9000, 0x1000, write=True), Buffer(0x8800, 1, write=True)]
    driver.add_indirect(buffers, heap)
    queue.pop()
    head = driver.add_indirect(buffers, heap)
    chain = queue.pop()
    assert chain.spans.inner_bytes is not None  # took the shortcut
    table, length, _, _ = DESC_FORMAT.unpack(memory.read(driver.desc + 16 * head, 16))
    memory.write(table, bytes(length))  # the guest wipes the table after the device took it
    assert [len(v) for v in chain.writable] == [0x1000, 1]
    assert [bytes(v) for v in chain.readable] == [memory.read(0x8000, 16)]


def test_changed_inner_entries_are_checked_again(memory):
    queue, driver, heap = make_queue(memory, size=16)
    header, status = Buffer(0x8000, 16), Buffer(0x8800, 1, write=True)
    driver.add_indirect([header, Buffer(0x9000, 0x1000, write=True), status], heap)
    queue.pop()
    driver.add_indirect([header, Buffer(RAM - 8, 0x1000, write=True), status], heap)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_reset_forgets_the_known_inner_entries(memory):
    queue, driver, heap = make_queue(memory, size=16)
    driver.add_indirect([Buffer(0x8000, 16), Buffer(0x9000, 8, write=True), Buffer(0x8800, 1, write=True)], heap)
    queue.pop()
    assert queue.checked_inner is not None
    queue.reset()
    assert queue.checked_inner is None


def test_used_ring_and_wraparound(memory):
    queue, driver, _ = make_queue(memory, size=4)
    for _round in range(20):  # 80 requests through a 4-entry queue wraps the indices
        heads = [driver.add_chain([Buffer(0x8000, 1, write=True)]) for _ in range(3)]
        for head in heads:
            chain = queue.pop()
            assert chain.head == head
            queue.push_used(chain.head, 1)
        assert queue.pop() is None
        assert driver.take_used() == [(h, 1) for h in heads]


@pytest.mark.parametrize("field", ["used idx", "avail_event"])
def test_a_driver_never_sees_a_ring_index_step_back(tmp_path, field):
    """The device's ring indices are stored whole: a vCPU that reads one while the device
    writes it sees the old or the new value, never a half-written one. (struct.pack_into
    zeroed the field first: Linux then took the stale slots that a used index of 0 seemed
    to publish, "id N is not a head!", or skipped a kick that avail_event asked for.)"""
    shared = GuestMemory([(0, RAM)], backing_file=str(tmp_path / "ram"))  # the child sees our stores
    try:
        queue, driver, _ = make_queue(shared, size=256, event_idx=True)
        if field == "used idx":
            address, step = driver.used + 2, lambda: queue.push_used(0, 0)
        else:
            driver.write_descriptor(driver.desc, 0, 0x8000, 1, VIRTQ_DESC_F_WRITE, 0)

            def step():
                driver.publish(0)
                assert queue.pop().head == 0
                assert queue.pop() is None  # an empty ring: the device asks for the next kick
            address = driver.used + 4 + 8 * 256
        # Before the fix about one change in a thousand went backwards (to 0, then up).
        moves, backwards = wrong_changes_seen(shared.host_address(address, 2), step)
    finally:
        shared.close()
    assert moves > 10_000, "the reader hardly saw the index move: the test proves nothing"
    assert backwards == 0, f"{backwards} of {moves} changes the reader saw went backwards"


def write_desc(memory, table, index, addr, length, flags, nxt):
    memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


@pytest.mark.parametrize("case", ["loop", "bad_next", "bad_head", "out_of_ram", "huge_len",
                                  "read_after_write", "nested_indirect", "indirect_with_next",
                                  "indirect_bad_len", "indirect_not_negotiated", "avail_too_far"])
def test_malformed_chains_raise_virtqueue_error(memory, case):
    queue, driver, heap = make_queue(memory, indirect=case != "indirect_not_negotiated")
    table = heap.alloc(64, 16)
    d = driver.desc
    if case == "loop":
        write_desc(memory, d, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1)
        write_desc(memory, d, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0)
    elif case == "bad_next":
        write_desc(memory, d, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, QSIZE)
    elif case == "bad_head":
        driver.publish(QSIZE + 3)
    elif case == "out_of_ram":
        write_desc(memory, d, 0, RAM - 2, 4, 0, 0)
    elif case == "huge_len":
        write_desc(memory, d, 0, 0x8000, 0xFFFFFFFF, 0, 0)
    elif case == "read_after_write":
        write_desc(memory, d, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
        write_desc(memory, d, 1, 0x8000, 1, 0, 0)
    elif case == "nested_indirect":
        write_desc(memory, table, 0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
        write_desc(memory, d, 0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    elif case == "indirect_with_next":
        write_desc(memory, table, 0, 0x8000, 1, 0, 0)
        write_desc(memory, d, 0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    elif case in ("indirect_bad_len", "indirect_not_negotiated"):
        write_desc(memory, d, 0, table, 24 if case == "indirect_bad_len" else 16, VIRTQ_DESC_F_INDIRECT, 0)
    elif case == "avail_too_far":
        memory.write_u16(driver.avail + 2, QSIZE + 1)
    if case not in ("bad_head", "avail_too_far"):
        driver.publish(0)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_several_chains_return_together_across_the_ring_wrap(memory):
    queue, driver, _ = make_queue(memory, size=4)
    for _ in range(3):  # used idx 3: the next three elements land in slots 3, 0 and 1
        driver.add_chain([Buffer(0x8000, 1)])
        queue.push_used(queue.pop().head, 0)
    driver.take_used()
    heads = []
    for _ in range(3):
        heads.append(driver.add_chain([Buffer(0x8000, 8, write=True)]))
        assert queue.pop().head == heads[-1]
    queue.push_used_many([(head, 5 + n) for n, head in enumerate(heads)])
    assert driver.used_idx() == 6 and queue.state.next_used == 6
    assert driver.take_used() == [(head, 5 + n) for n, head in enumerate(heads)]
    queue.deactivate()
    queue.push_used_many([(heads[0], 1)])  # a stopped queue takes nothing
    assert driver.used_idx() == 6


def test_no_interrupt_flag_without_event_idx(memory):
    queue, driver, _ = make_queue(memory)
    assert not queue.needs_notification()  # nothing used yet
    driver.add_chain([Buffer(0x8000, 1)])
    queue.push_used(queue.pop().head, 0)
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not queue.needs_notification()
    driver.add_chain([Buffer(0x8000, 1)])
    queue.push_used(queue.pop().head, 0)
    driver.set_avail_flags(0)
    assert queue.needs_notification()
    assert not queue.needs_notification()  # already told


def test_event_idx_suppresses_until_used_event(memory):
    queue, driver, _ = make_queue(memory, event_idx=True)
    driver.set_used_event(2)  # "interrupt me when used idx passes 2"
    results = []
    for _ in range(4):
        driver.add_chain([Buffer(0x8000, 1)])
        queue.push_used(queue.pop().head, 0)
        results.append(queue.needs_notification())
    assert results == [False, False, True, False]
    assert queue.pop() is None
    assert driver.avail_event() == 4  # device asks to be kicked for the next buffer


# -- fuzzing -------------------------------------------------------------------------
FUZZ_SIZE = 8
FUZZ_TABLE = 0x2000  # a spare 16-entry area the fuzzer can aim indirect descriptors at

addresses = st.one_of(st.integers(0, RAM + 64), st.sampled_from([FUZZ_TABLE, 0x8000, RAM - 1, 2**64 - 1]))
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 0xFFFFFFFF, 2**31]))
descriptors = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, FUZZ_SIZE + 2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptors, min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
       indirect=st.lists(descriptors, min_size=16, max_size=16),
       ring=st.lists(st.integers(0, 0xFFFF), min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
       avail_idx=st.integers(0, 0xFFFF), next_avail=st.integers(0, 0xFFFF),
       event_idx=st.booleans())
def test_fuzz_pop_only_raises_virtqueue_error(memory, table, indirect, ring, avail_idx, next_avail, event_idx):
    queue, driver, _ = make_queue(memory, FUZZ_SIZE, event_idx=event_idx)
    for i, desc in enumerate(table):
        write_desc(memory, driver.desc, i, *desc)
    for i, desc in enumerate(indirect):
        write_desc(memory, FUZZ_TABLE, i, *desc)
    for i, head in enumerate(ring):
        memory.write_u16(driver.avail + 4 + 2 * i, head)
    memory.write_u16(driver.avail + 2, avail_idx)
    queue.state.next_avail = next_avail
    for _ in range(FUZZ_SIZE + 1):
        try:
            chain = queue.pop()
        except VirtqueueError:
            return
        if chain is None:
            return
        assert len(chain.readable) + len(chain.writable) <= 16
        queue.push_used(chain.head, 0)
    pytest.fail("pop() returned more chains than the queue holds")
