"""KVM's coalesced MMIO ring from user space's side, on a file page standing in for KVM's."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from ember.kvm.coalesced import RING_ENTRIES, RING_ENTRY, RING_HEADER, CoalescedMmioRing
from ember.kvm.structs import PAGE_SIZE
from tests.torn_stores import wrong_changes_seen


@pytest.fixture
def page(tmp_path):
    """(KVM's side of the ring page, Ember's CoalescedMmioRing on the same page)."""
    path = tmp_path / "ring-page"
    path.write_bytes(bytes(PAGE_SIZE))
    fd = os.open(path, os.O_RDWR)
    kvm_side = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED)
    ring = CoalescedMmioRing(fd, 0)
    try:
        yield kvm_side, ring
    finally:
        ring.close()
        kvm_side.close()
        os.close(fd)


def test_draining_frees_slots_with_whole_stores_of_first(page):
    """KVM reads ``first`` while it appends: it must see the old or the new value. A torn
    store (0, then the bytes) makes the ring look drained to slot 0, and KVM would write
    over entries not yet replayed."""
    kvm_side, ring = page
    first = ctypes.c_uint32.from_buffer(kvm_side)  # the header: first (next to read), last
    last = ctypes.c_uint32.from_buffer(kvm_side, 4)
    replayed = []
    try:
        for slot in range(RING_ENTRIES):
            RING_ENTRY.pack_into(kvm_side, RING_HEADER.size + slot * RING_ENTRY.size, 0xD000_0000 + slot, 4, 0,
                                 slot.to_bytes(8, "little"))

        def kvm_appends_then_user_space_drains():  # first runs 1, 2, ..., 61: never 0
            first.value, last.value = 1, 61
            replayed.append(ring.drain(lambda addr, data: None))

        moves, zeros = wrong_changes_seen(ctypes.addressof(first), kvm_appends_then_user_space_drains,
                                          is_wrong=lambda _last, value: value == 0, width=ctypes.c_uint32)
        assert set(replayed) == {60}, "each drain replays what KVM appended"
    finally:
        first = last = None  # let kvm_side close
    assert moves > 10_000, "the reader hardly saw first move: the test proves nothing"
    assert zeros == 0, f"the reader saw first at 0 {zeros} times in {moves} changes"


def test_drain_replays_in_order_across_the_end_of_the_page(page):
    kvm_side, ring = page
    start = RING_ENTRIES - 2
    for n, slot in enumerate((start, start + 1, 0)):
        RING_ENTRY.pack_into(kvm_side, RING_HEADER.size + slot * RING_ENTRY.size, 0x1000 + n, 2, 0,
                             bytes((n, n)) + bytes(6))
    RING_HEADER.pack_into(kvm_side, 0, start, 1)
    seen = []
    assert ring.pending()
    assert ring.drain(lambda addr, data: seen.append((addr, data))) == 3
    assert seen == [(0x1000, b"\0\0"), (0x1001, b"\1\1"), (0x1002, b"\2\2")]
    assert RING_HEADER.unpack_from(kvm_side, 0) == (1, 1) and not ring.pending()
