"""The device event loop: readers, writers, thread-safe calls, failing callbacks."""

from __future__ import annotations

import os
import socket
import threading

from ember.eventloop import EventLoop


def test_reader_writer_and_call_soon():
    loop = EventLoop()
    loop.start()
    try:
        a, b = socket.socketpair()
        got = threading.Event()
        writable = threading.Event()
        called = threading.Event()

        def on_read():
            assert a.recv(10) == b"x"
            got.set()

        loop.add_reader(a.fileno(), on_read)
        loop.add_writer(a.fileno(), lambda: (writable.set(), loop.remove_writer(a.fileno())))
        assert writable.wait(5)
        b.send(b"x")
        assert got.wait(5)
        loop.call_soon_threadsafe(called.set)
        assert called.wait(5)
        loop.remove_reader(a.fileno())
        a.close()
        b.close()
    finally:
        loop.close()


def test_a_failing_callback_does_not_stop_the_loop():
    loop = EventLoop()
    loop.start()
    try:
        loop.call_soon_threadsafe(lambda: 1 / 0)
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)
        assert done.wait(5)
    finally:
        loop.close()


def test_a_failing_reader_does_not_keep_the_writer_of_its_fd_from_running():
    loop = EventLoop()
    a, b = socket.socketpair()
    b.send(b"x")  # a is readable and writable in the same turn
    writable = threading.Event()
    loop.add_reader(a.fileno(), lambda: 1 / 0)
    loop.add_writer(a.fileno(), lambda: (writable.set(), loop.remove_writer(a.fileno())))
    loop.start()
    try:
        assert writable.wait(5)
    finally:
        loop.close()
        a.close()
        b.close()


def test_eventfd_reader_fires_once_per_signal():
    loop = EventLoop()
    loop.start()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    hits = []
    fired = threading.Event()

    def on_event():
        hits.append(os.eventfd_read(fd))
        fired.set()

    try:
        loop.add_reader(fd, on_event)
        os.eventfd_write(fd, 3)
        assert fired.wait(5)
        assert hits == [3]
    finally:
        loop.close()
        os.close(fd)


def test_call_later_runs_timers_in_due_order_from_any_thread():
    loop = EventLoop()
    loop.start()
    try:
        order, done = [], threading.Event()
        loop.call_later(0.15, lambda: (order.append("late"), done.set()))
        threading.Thread(target=loop.call_later, args=(0.05, lambda: order.append("early"))).start()
        loop.call_soon_threadsafe(lambda: order.append("soon"))
        assert done.wait(5)
        assert order == ["soon", "early", "late"]
    finally:
        loop.close()


def test_a_reader_removed_by_an_earlier_callback_of_the_same_turn_is_not_called():
    """Two fds ready in one epoll turn: the first one's callback removes the second's reader
    and closes it (as a device teardown does), and the stale callback never runs."""
    loop = EventLoop()
    first, second = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    calls = []
    done = threading.Event()

    def on_first():
        os.eventfd_read(first)
        calls.append("first")
        if "second" not in calls:
            loop.remove_reader(second)
        loop.call_soon_threadsafe(done.set)

    def on_second():
        os.eventfd_read(second)
        calls.append("second")
        loop.remove_reader(first)
        loop.call_soon_threadsafe(done.set)

    try:
        loop.add_reader(first, on_first)
        loop.add_reader(second, on_second)
        os.eventfd_write(first, 1)
        os.eventfd_write(second, 1)
        loop.start()  # both are ready before the loop's first turn
        assert done.wait(5)
        assert calls in (["first"], ["second"])  # whichever ran first removed the other
    finally:
        loop.close()
        os.close(first)
        os.close(second)


def test_a_hang_up_wakes_the_reader_and_removing_a_closed_fd_is_harmless():
    loop = EventLoop()
    loop.start()
    a, b = socket.socketpair()
    woke = threading.Event()

    def on_read():
        assert a.recv(10) == b""  # end of stream
        loop.remove_reader(a.fileno())
        woke.set()

    try:
        loop.add_reader(a.fileno(), on_read)
        b.close()
        assert woke.wait(5)
        c, d = socket.socketpair()
        loop.add_reader(c.fileno(), lambda: None)
        fd = c.fileno()
        c.close()
        d.close()
        loop.remove_reader(fd)  # epoll dropped it with the close; removing it must not raise
    finally:
        loop.close()
        a.close()
