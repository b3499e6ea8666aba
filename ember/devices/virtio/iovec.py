"""preadv/pwritev straight between a file and guest RAM, from a descriptor table.

``os.preadv`` wants one buffer object per segment; a 1 MiB virtio-blk request
is 256 of them, and making those costs more than the syscall's own work.
Instead, a chain's indirect table (16-byte entries: address, length, flags,
next; VIRTIO 1.2 2.7.5) becomes the kernel's ``struct iovec`` array (16-byte
entries: host address, length) in a few whole-table integer operations, with
every buffer checked to lie inside one RAM region, and libc's preadv/pwritev
run on it with the GIL released, as os.preadv would.
"""

from __future__ import annotations

import ctypes
import functools
import os
from array import array

_libc = ctypes.CDLL(None, use_errno=True)
_SIGNATURE = ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64], ctypes.c_ssize_t)
for _name in ("preadv", "pwritev"):
    getattr(_libc, _name).argtypes, getattr(_libc, _name).restype = _SIGNATURE

IOV_MAX = 1024  # Linux's UIO_MAXIOV
ENTRY_SIZE = 16  # a descriptor and an iovec alike
HALF = 64  # bits in each half of an entry
_HALF_MASK = (1 << HALF) - 1
_LENGTH_MASK = 0xFFFF_FFFF  # a descriptor's u32 length; flags and next sit above it


@functools.lru_cache(maxsize=256)
def _in_every_entry(value: int, count: int, shift: int = 0) -> int:
    """``value << shift`` in each of ``count`` 128-bit entries, as one integer."""
    return int.from_bytes(((value << shift).to_bytes(ENTRY_SIZE, "little")) * count, "little")


def from_descriptors(table: bytes, gpa: int, size: int, host: int) -> array | None:
    """The iovec array of descriptor ``table`` if every buffer lies in the RAM region
    [gpa, gpa + size) mapped at host address ``host``; None if any does not.

    The table is read as one integer of 128-bit entries and masked into its
    address and length columns. Subtracting the region's base from every entry
    at once gives the offsets; an address below the base, or a buffer past the
    region's end, borrows from the entry above and so shows in an upper half.
    Offsets plus the host base, with the lengths kept in the upper halves, are
    the iovecs. Every entry stays below 2**128, so no sum carries into the next.
    """
    count = len(table) // ENTRY_SIZE
    entries = int.from_bytes(table, "little")
    upper = _in_every_entry(_HALF_MASK, count, HALF)
    offsets = (entries & _in_every_entry(_HALF_MASK, count)) - _in_every_entry(gpa, count)
    if offsets < 0 or offsets & upper:
        return None
    lengths_up = entries & _in_every_entry(_LENGTH_MASK, count, HALF)  # each length, in its upper half
    room = _in_every_entry(size, count) - offsets - (lengths_up >> HALF)
    if room < 0 or room & upper:
        return None
    iov = array("Q")
    iov.frombytes((offsets + _in_every_entry(host, count) + lengths_up).to_bytes(len(table), "little"))
    return iov


def _call(function, fd: int, iov: array, offset: int, first: int, count: int | None) -> int:
    address, words = iov.buffer_info()
    available = words // 2 - first
    count = available if count is None else count
    if first < 0 or not 0 <= count <= available:
        raise ValueError(f"iovecs {first}+{count} outside an array of {words // 2}")
    done = function(fd, address + first * ENTRY_SIZE, count, offset)
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return done


def preadv(fd: int, iov: array, offset: int, first: int = 0, count: int | None = None) -> int:
    """Bytes read into the buffers of iovecs first..first+count-1 (all from ``first``
    by default); OSError on failure."""
    return _call(_libc.preadv, fd, iov, offset, first, count)


def pwritev(fd: int, iov: array, offset: int, first: int = 0, count: int | None = None) -> int:
    """Bytes written from the buffers of iovecs first..first+count-1 (all from ``first``
    by default); OSError on failure."""
    return _call(_libc.pwritev, fd, iov, offset, first, count)
