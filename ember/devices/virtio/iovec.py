"""preadv/pwritev straight between a file and guest RAM, from columns of guest addresses.

``os.preadv`` wants one buffer object per segment; a 1 MiB virtio-blk request
is 256 of them, and making those costs more than the syscall's own work. Here
the kernel's ``struct iovec`` array (base, length: two u64 each) is filled from
the guest-physical start and length columns of a chain (queue.GuestSpans) in
a few whole-array operations, and libc's preadv/pwritev run on it with the GIL
released, as os.preadv would.
"""

from __future__ import annotations

import ctypes
import os
from array import array

_libc = ctypes.CDLL(None, use_errno=True)
_SIGNATURE = ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64], ctypes.c_ssize_t)
for _name in ("preadv", "pwritev"):
    getattr(_libc, _name).argtypes, getattr(_libc, _name).restype = _SIGNATURE

IOV_MAX = 1024  # Linux's UIO_MAXIOV


def iovec_array(host_delta: int, starts: list[int], lengths: list[int]) -> array:
    """The iovec array of buffers at guest addresses ``starts`` (host address = gpa + host_delta)."""
    iov = array("Q", bytes(16 * len(starts)))
    iov[0::2] = array("Q", [start + host_delta for start in starts])
    iov[1::2] = array("Q", lengths)
    return iov


def _call(function, fd: int, iov: array, offset: int) -> int:
    address, words = iov.buffer_info()
    done = function(fd, address, words // 2, offset)
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return done


def preadv(fd: int, iov: array, offset: int) -> int:
    """Bytes read into the iovec array's buffers (OSError on failure)."""
    return _call(_libc.preadv, fd, iov, offset)


def pwritev(fd: int, iov: array, offset: int) -> int:
    """Bytes written from the iovec array's buffers (OSError on failure)."""
    return _call(_libc.pwritev, fd, iov, offset)
