"""The descriptor table -> iovec conversion (iovec.from_descriptors) against a per-entry reference."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.devices.virtio import iovec

DESC = struct.Struct("<QIHH")
U64 = (1 << 64) - 1


def table(entries: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(DESC.pack(*entry) for entry in entries)


def reference(entries, gpa: int, size: int, host: int) -> list[int] | None:
    iov = []
    for addr, length, _flags, _next in entries:
        if addr < gpa or addr + length > gpa + size:
            return None
        iov += [addr - gpa + host, length]
    return iov


GPA = st.sampled_from([0, 0x1000, 0x1_0000_0000, 0xFFFF_F000])
entry = st.tuples(st.integers(0, U64), st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))


@settings(max_examples=300, deadline=None)
@given(gpa=GPA, size=st.integers(1, 1 << 40), host=st.integers(0, (1 << 47) - 1), data=st.data())
def test_matches_the_per_entry_check(gpa, size, host, data):
    """Near-the-edge addresses and lengths, and any flag and next bits, as a hostile driver writes them."""
    near = st.one_of(st.integers(gpa - 4096, gpa + 4096), st.integers(gpa + size - 8192, gpa + size + 4096),
                     st.integers(gpa, gpa + size)).map(lambda a: a & U64)
    any_entry = st.one_of(entry, st.tuples(near, st.integers(0, 0x10000), st.integers(0, 0xFFFF),
                                           st.integers(0, 0xFFFF)))
    entries = data.draw(st.lists(any_entry, min_size=1, max_size=64))
    got = iovec.from_descriptors(table(entries), gpa, size, host)
    assert (None if got is None else list(got)) == reference(entries, gpa, size, host)


def test_one_buffer_past_the_end_refuses_the_whole_table():
    entries = [(0x1000 * i, 0x1000, 1, i + 1) for i in range(8)] + [(0x8000, 0x1001, 2, 0)]
    assert iovec.from_descriptors(table(entries), 0, 0x9000, 0x7F00_0000_0000) is None
    entries[-1] = (0x8000, 0x1000, 2, 0)
    got = iovec.from_descriptors(table(entries), 0, 0x9000, 0x7F00_0000_0000)
    assert list(got)[-2:] == [0x7F00_0000_8000, 0x1000]


def test_an_address_below_the_region_refuses_the_whole_table():
    entries = [(0x2000, 16, 1, 1), (0xFFF, 1, 2, 0)]
    assert iovec.from_descriptors(table(entries), 0x1000, 0x10000, 0x5000_0000) is None


def test_preadv_and_pwritev_serve_a_range_of_the_iovec_array(tmp_path):
    """A request's data sits between header and status: the call covers just those iovecs."""
    import ctypes
    import os
    from array import array

    buffers = [ctypes.create_string_buffer(8) for _ in range(4)]
    iov = array("Q")
    for buf in buffers:
        iov.extend((ctypes.addressof(buf), 8))
    path = tmp_path / "f"
    path.write_bytes(bytes(range(64)))
    fd = os.open(path, os.O_RDWR)
    try:
        assert iovec.preadv(fd, iov, 8, 1, 2) == 16
        assert [buf.raw for buf in buffers] == [bytes(8), bytes(range(8, 16)), bytes(range(16, 24)), bytes(8)]
        buffers[1].raw = b"A" * 8
        assert iovec.pwritev(fd, iov, 40, 1) == 24  # from iovec 1 to the end
        assert path.read_bytes()[40:64] == b"A" * 8 + bytes(range(16, 24)) + bytes(8)
        for first, count in ((0, 5), (3, 2), (-1, 1), (1, -1)):
            with pytest.raises(ValueError):
                iovec.preadv(fd, iov, 0, first, count)
    finally:
        os.close(fd)
