"""The device event loop: one thread serving every file descriptor a VM waits on.

ioeventfds (virtio queue notifications), backends (TAP, files, sockets), the
console input and the agent socket are all served here with epoll, so device
work never runs on a vCPU thread. Callbacks must not block; an exception in
one is logged and never stops the loop.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class EventLoop:
    """A small epoll loop with a thread-safe way in (``call_soon_threadsafe``)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._pending: deque[Callback] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)
        self._running = False
        self._thread: threading.Thread | None = None

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)
        self._wake()

    def remove_reader(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self._pending.append(callback)
        self._wake()

    def start(self, name: str = "ember-events") -> None:
        self._running = True
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def run(self) -> None:
        self._running = True
        while self._running:
            for key, _ in self._selector.select():
                self._call(key.data)
            while self._pending:
                self._call(self._pending.popleft())

    def stop(self) -> None:
        self._running = False
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._selector.close()
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
