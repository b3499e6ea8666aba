"""The device event loop: one thread serving every file descriptor a VM waits on.

ioeventfds (virtio queue notifications), backends (TAP, files, sockets), the
console input and the agent socket are all served here with epoll, so device
work never runs on a vCPU thread; timers (``call_later``) bring back queues a
rate limiter held. Callbacks must not block; an exception in one is logged
and never stops the loop. Every guest I/O request passes through one turn of
this loop, so it uses select.epoll directly (the selectors module costs a few
Python calls per wake-up).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]

_READ, _WRITE = select.EPOLLIN, select.EPOLLOUT
# A hang-up or error wakes both directions' callbacks, whose own read or write then sees it.
_WAKES_READER = ~_WRITE
_WAKES_WRITER = ~_READ


class EventLoop:
    """A small epoll loop with a thread-safe way in (``call_soon_threadsafe``)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, tuple[Callback | None, Callback | None]] = {}  # fd -> (reader, writer)
        self._pending: deque[Callback] = deque()
        self._timers: list[tuple[float, int, Callback]] = []  # (due, tie-breaker, callback), a heap
        self._timer_order = itertools.count()
        self._timer_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _READ)
        self._callbacks[self._wake_r] = (self._drain_wakeups, None)
        self._running = False
        self._thread: threading.Thread | None = None

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._set(fd, _READ, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, _READ, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, _WRITE, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, _WRITE, None)

    def _set(self, fd: int, event: int, callback: Callback | None) -> None:
        """Set or clear the callback for one direction of fd, keeping the other."""
        known = self._callbacks.get(fd)
        reader, writer = known if known is not None else (None, None)
        if event == _READ:
            reader = callback
        else:
            writer = callback
        mask = (_READ if reader else 0) | (_WRITE if writer else 0)
        if known is not None and mask:
            self._callbacks[fd] = (reader, writer)
            self._epoll.modify(fd, mask)
        elif known is not None:
            del self._callbacks[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed already: epoll forgot it with its last reference
                pass
        elif mask:
            self._epoll.register(fd, mask)
            self._callbacks[fd] = (reader, writer)
        self._wake()

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self._pending.append(callback)
        self._wake()

    def call_later(self, delay: float, callback: Callback) -> None:
        """Run ``callback`` on the loop ``delay`` seconds from now (safe from any thread)."""
        with self._timer_lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_order), callback))
        self._wake()

    def _next_timeout(self) -> float | None:
        if not self._timers:  # the common case, every turn of the loop: no lock taken
            return None  # a timer added meanwhile wakes the loop, and the next turn sees it
        with self._timer_lock:
            return None if not self._timers else max(0.0, self._timers[0][0] - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._timer_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, callback = heapq.heappop(self._timers)
            self._call(callback)

    def start(self, name: str = "ember-events") -> None:
        self._running = True
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def run(self) -> None:
        self._running = True
        callbacks = self._callbacks
        while self._running:
            timeout = self._next_timeout()
            for fd, events in self._epoll.poll(-1 if timeout is None else timeout):
                reader, writer = callbacks.get(fd, (None, None))  # None: removed by an earlier callback
                if events & _WAKES_READER and reader is not None:
                    self._call(reader)
                if events & _WAKES_WRITER and writer is not None:
                    self._call(writer)
            while self._pending:
                self._call(self._pending.popleft())
            if self._timers:
                self._run_due_timers()

    def stop(self) -> None:
        self._running = False
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _call(self, callback: Callback) -> None:
        try:
            callback()
        except Exception:  # a failing device must not stop the others
            log.exception("event callback %r failed", callback)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake already

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
