"""Scatter-gather lists of guest buffers: split, gather and scatter memoryviews.

A descriptor chain hands a device its guest buffers as lists of memoryviews
(VIRTIO 1.2 section 2.7.5); these helpers move bytes across such lists
without copying more than once.
"""

from __future__ import annotations


def split_views(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split a scatter list after its first n bytes (fewer if it is shorter)."""
    head: list[memoryview] = []
    for i, view in enumerate(views):
        if n <= 0:
            return head, views[i:]
        if len(view) > n:
            return head + [view[:n]], [view[n:]] + views[i + 1:]
        head.append(view)
        n -= len(view)
    return head, []


def gather(views: list[memoryview]) -> bytes:
    """The bytes of a scatter list, joined."""
    return b"".join(views)


def scatter(views: list[memoryview], data: bytes | memoryview) -> int:
    """Copy data into the views in order; returns bytes copied."""
    done = 0
    for view in views:
        if done >= len(data):
            break
        n = min(len(view), len(data) - done)
        view[:n] = data[done:done + n]
        done += n
    return done
