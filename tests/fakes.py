"""Test doubles the device tests share: an interrupt line that counts, an event loop pumped by hand."""

from __future__ import annotations

import selectors


class RecordingIrq:
    """An IrqLine that counts the edges it was asked to raise."""

    def __init__(self):
        self.count = 0

    def trigger(self):
        self.count += 1


class ManualLoop:
    """The event-loop interface (readers, writers, call_soon_threadsafe), pumped by hand so tests
    are deterministic. ``ROUNDS`` bounds one pump: a device that never goes idle fails the test."""

    ROUNDS = 200

    def __init__(self):
        self.readers, self.writers, self.soon = {}, {}, []
        self.later: list[tuple[float, object]] = []  # call_later's (delay, callback), run by fire_timers

    def call_later(self, delay, callback):
        self.later.append((delay, callback))

    def fire_timers(self):
        """Run every timer now, whatever its delay (the test moved its clock first)."""
        later, self.later = self.later, []
        for _, callback in later:
            callback()

    def add_reader(self, fd, callback):
        assert fd not in self.readers, "reader added twice"
        self.readers[fd] = callback

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def add_writer(self, fd, callback):
        assert fd not in self.writers, "writer added twice"
        self.writers[fd] = callback

    def remove_writer(self, fd):
        self.writers.pop(fd, None)

    def call_soon_threadsafe(self, callback):
        self.soon.append(callback)

    def pump(self, rounds=None, timeout=0.0):
        """Run ready callbacks until nothing is ready."""
        for _ in range(self.ROUNDS if rounds is None else rounds):
            ready = self._ready(timeout)
            soon, self.soon = self.soon, []
            if not ready and not soon:
                return
            for callback in ready + soon:
                callback()
        raise AssertionError("event loop never went idle")

    def _ready(self, timeout):
        with selectors.DefaultSelector() as sel:
            for table, event in ((self.readers, selectors.EVENT_READ), (self.writers, selectors.EVENT_WRITE)):
                for fd, callback in table.items():
                    try:
                        key = sel.get_key(fd)
                        sel.modify(fd, key.events | event, key.data + [(event, callback)])
                    except KeyError:
                        sel.register(fd, event, [(event, callback)])
            if not sel.get_map():
                return []
            return [cb for key, mask in sel.select(timeout) for event, cb in key.data if mask & event]
