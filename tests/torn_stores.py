"""Watch a shared-memory index from another process, the way a vCPU or KVM reads it.

A device publishes ring indices that the guest (or KVM) reads at any moment.
A forked child reads the index with one load per read, in a C-level ctypes
access, and counts the changes it saw that no whole store makes: a store that
is not one write (struct.pack_into zeroes a field, then writes its bytes)
shows up as a step back to 0.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Callable


def stepped_back(last: int, value: int) -> bool:
    """For a free-running u16 index: the change went backwards."""
    return (value - last) & 0xFFFF >= 0x8000


def _watch(address: int, width: type, is_wrong: Callable[[int, int], bool], enough: int,
           seconds: float) -> tuple[int, int]:
    """Fork the watcher; returns (pid, the read end of the pipe its counts come on)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return pid, read_end
    moves = wrong = 0
    try:
        cell = width.from_address(address)
        last = cell.value
        deadline = time.monotonic() + seconds
        while moves < enough and time.monotonic() < deadline:
            for _ in range(5000):
                value = cell.value
                if value != last:
                    moves += 1
                    if is_wrong(last, value):
                        wrong += 1
                    last = value
        os.write(write_end, f"{moves} {wrong}".encode())
    finally:
        os._exit(0)


def wrong_changes_seen(address: int, step: Callable[[], None], *,
                       is_wrong: Callable[[int, int], bool] = stepped_back, width: type = ctypes.c_uint16,
                       enough: int = 50_000, seconds: float = 5.0) -> tuple[int, int]:
    """Call ``step`` (which changes the index at ``address``) until a watcher process has
    seen the index change ``enough`` times or ``seconds`` passed. Returns (changes seen,
    changes for which ``is_wrong(last, value)`` was true)."""
    pid, results = _watch(address, width, is_wrong, enough, seconds)
    while not os.waitpid(pid, os.WNOHANG)[0]:
        for _ in range(200):
            step()
    with os.fdopen(results) as pipe:
        moves, wrong = map(int, pipe.read().split())
    return moves, wrong
