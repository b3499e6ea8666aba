"""TCP throughput guest → host over a TAP interface (virtio-net in both VMMs).

The host end is a persistent TAP (Linux Documentation/networking/tuntap.rst)
made with iproute2, addressed 10.200.0.1/24; the guest's busybox nc sends
zeros to a socket on the host, which times first byte to last.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

from benchmarks.console import BenchError, ConsoleProcess
from benchmarks.settings import Settings
from benchmarks.vmm import Guest, Launch, Tap, argv_for

TAP_NAME = "embbench0"
HOST_IP, GUEST_IP, PREFIX = "10.200.0.1", "10.200.0.2", 24
PORT = 5201
CHUNK = 1 << 16
MIB = 1 << 20
NET_GO, DONE_MARK = "NET-GO", "EMBER-BENCH-DONE"


def unavailable() -> str | None:
    """Why TCP cannot be measured here, or None when it can."""
    helped = subprocess.run([sys.executable, "-m", "ember", "run", "--help"], capture_output=True, text=True)
    usage = helped.stdout
    if "--net" not in usage.split():
        return "not measured: Ember has no network device yet (`ember run` has no --net)"
    if subprocess.run(["ip", "tuntap", "help"], capture_output=True).returncode not in (0, 255):
        return "not measured: iproute2 cannot make TAP devices here"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class TapNetwork:
    """A persistent TAP with the host's address on it, removed on exit."""

    def __enter__(self) -> Tap:
        _ip("tuntap", "add", "dev", TAP_NAME, "mode", "tap")
        _ip("addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP_NAME)
        _ip("link", "set", TAP_NAME, "up")
        return Tap(TAP_NAME)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "tuntap", "del", "dev", TAP_NAME, "mode", "tap"], capture_output=True)


class Sink:
    """Accept one connection; time from its first byte until ``expected`` bytes arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seconds: float | None = None
        self.server = socket.create_server((HOST_IP, PORT), reuse_port=True)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            received, first = 0, None
            while received < self.expected and (data := conn.recv(CHUNK)):
                first = first or time.monotonic()
                received += len(data)
            if received >= self.expected and first is not None:
                self.seconds = time.monotonic() - first

    def close(self) -> None:
        self.server.close()


def guest_command(mib: int) -> str:
    blocks = mib * MIB // CHUNK
    return (f"ip addr add {GUEST_IP}/{PREFIX} dev eth0; ip link set eth0 up; echo {NET_GO}; "
            f"dd if=/dev/zero bs={CHUNK} count={blocks} 2>/dev/null | nc {HOST_IP} {PORT}; echo {DONE_MARK}")


def tcp_once(vmm: str, guest: Guest, s: Settings, tap: Tap) -> float:
    """MiB/s of one guest → host transfer."""
    subprocess.run(["ip", "neigh", "flush", "dev", tap.name], capture_output=True)
    sink = Sink(s.net_mib * MIB)
    try:
        with ConsoleProcess(argv_for(vmm, Launch(guest, guest_command(s.net_mib), tap=tap)), name=vmm) as proc:
            proc.wait_for(DONE_MARK, s.net_timeout_s)
            sink.thread.join(timeout=s.net_timeout_s)
            proc.finish()
    finally:
        sink.close()
    if sink.seconds is None:
        raise BenchError(f"{vmm}: the host received less than {s.net_mib} MiB over TCP")
    return s.net_mib / sink.seconds
