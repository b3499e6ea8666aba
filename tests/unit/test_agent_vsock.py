"""`ember exec` over vsock, host side: the Firecracker handshake client against a fake device socket.

The fake device answers "CONNECT 52" like Ember's vsock muxer: it refuses
(closes) while the guest agent "is not listening yet", then says "OK <n>" and
hands the stream to a real agent.sh run by busybox sh on the host.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from importlib import resources
from pathlib import Path

import pytest

from ember import agent
from ember.errors import EmberError

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
AGENT = Path(str(resources.files("ember.images").joinpath("agent.sh")))
needs_busybox = pytest.mark.skipif(not Path(BUSYBOX).exists(),
                                   reason="busybox is not installed (apt-get install busybox-static)")


class FakeVsockDevice:
    """A Unix-socket server speaking the device side of the handshake, one connection at a time."""

    def __init__(self, path: Path, refusals: int = 0, answer: bytes = b"OK 1024\n") -> None:
        self.path, self.refusals, self.answer = str(path), refusals, answer
        self.lines: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                self.lines.append(line)
                if self.refusals > 0:
                    self.refusals -= 1
                    continue  # nobody listens on the guest port: the device hangs up
                conn.sendall(self.answer)
                if self.answer.startswith(b"OK"):
                    self.run_agent(conn)

    @staticmethod
    def run_agent(conn: socket.socket) -> None:
        subprocess.run([BUSYBOX, "sh", str(AGENT), "-"], stdin=conn, stdout=conn, timeout=30)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def device(tmp_path):
    made: list[FakeVsockDevice] = []

    def make(**kwargs) -> FakeVsockDevice:
        made.append(FakeVsockDevice(tmp_path / "v.sock", **kwargs))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


@needs_busybox
def test_exec_over_vsock_retries_until_the_agent_listens(device):
    dev = device(refusals=3)
    out, err, status = agent.exec_in_guest_vsock(dev.path, "echo out-$((6*7)); echo err >&2; exit 5", timeout=30)
    assert (out, err, status) == (b"out-42\n", b"err\n", 5)
    assert dev.lines == [b"CONNECT 52\n"] * 4


@needs_busybox
def test_run_command_vsock_prints_and_returns_status(device, capfd):
    dev = device()
    assert agent.run_command_vsock(dev.path, ["sh", "-c", "printf 'a b'; exit 3"], timeout=30) == 3
    captured = capfd.readouterr()
    assert captured.out == "a b" and captured.err == ""


def test_other_port(device, monkeypatch):
    dev = device(answer=b"OK 7\nREADY 0 1\nOUT 9 aGk=\nERR 9 \nRC 9 0\n")
    monkeypatch.setattr(agent.os, "getpid", lambda: 9)
    assert agent.exec_in_guest_vsock(dev.path, "x", port=1234, timeout=10) == (b"hi", b"", 0)
    assert dev.lines == [b"CONNECT 1234\n"]


@pytest.mark.parametrize("answer", [b"NO\n", b"OK x\n", b"OK 1 2\n", b"X" * 100])
def test_bad_handshake_answer_is_an_error(device, answer):
    dev = device(answer=answer)
    with pytest.raises(EmberError, match="handshake|CONNECT|closed"):
        agent.exec_in_guest_vsock(dev.path, "true", timeout=5)


def test_agent_never_listening_times_out(device):
    dev = device(refusals=10**6)
    start = time.monotonic()
    with pytest.raises(EmberError, match="cannot reach the guest agent"):
        agent.exec_in_guest_vsock(dev.path, "true", timeout=1.0)
    assert time.monotonic() - start < 3


def test_missing_socket_times_out(tmp_path):
    with pytest.raises(EmberError, match="cannot reach the guest agent"):
        agent.exec_in_guest_vsock(str(tmp_path / "nothing"), "true", timeout=0.3)


def test_empty_command_is_refused():
    with pytest.raises(EmberError, match="--vsock"):
        agent.run_command_vsock("/nonexistent", [], timeout=1)
