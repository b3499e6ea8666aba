"""Shared pieces of the API tests: a fake MicroVM and an HTTP client over a Unix socket.

The fake has MicroVM's methods and states but boots nothing, so the API's
behaviour can be checked on a host that cannot run Linux guests.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from ember.api.controller import VmmController
from ember.api.server import ApiServer
from ember.errors import EmberError


@dataclass(frozen=True)
class FakeExit:
    reason: str
    status: int | None = None


class FakeMachine:
    """MicroVM's surface; records calls; ``finish()`` ends it like a guest would."""

    instances: list["FakeMachine"] = []

    def __init__(self, config, *, fail_start: str | None = None, exit_at_start: FakeExit | None = None):
        self.config = config
        self.state = "Not started"
        self.calls: list[str] = []
        self._fail_start = fail_start
        self._exit_at_start = exit_at_start
        self._done = threading.Event()
        self.exit: FakeExit | None = None
        self.reads = 0  # the drive's total reads, one more at each metrics() call
        FakeMachine.instances.append(self)

    def start(self) -> None:
        self.calls.append("start")
        if self._fail_start:
            raise EmberError(self._fail_start)
        self.state = "Running"
        if self._exit_at_start:
            self.finish(self._exit_at_start)

    def pause(self) -> None:
        if self.state != "Running":
            raise EmberError(f"cannot pause a microVM that is {self.state.lower()}")
        self.calls.append("pause")
        self.state = "Paused"

    def resume(self) -> None:
        if self.state != "Paused":
            raise EmberError(f"cannot resume a microVM that is {self.state.lower()}")
        self.calls.append("resume")
        self.state = "Running"

    def send_ctrl_alt_del(self) -> None:
        self.calls.append("ctrl_alt_del")
        self.finish(FakeExit("reboot"))

    def stop(self) -> None:
        self.calls.append("stop")
        self.finish(FakeExit("stopped"))

    def finish(self, info: FakeExit) -> None:
        if self.exit is None:
            self.exit = info
            self.state = "Exited"
            self._done.set()

    def wait(self, timeout: float | None = None) -> FakeExit | None:
        return self.exit if self._done.wait(timeout) else None

    def metrics(self) -> dict:
        """Totals since the start, as a machine reports them; the drive's grow by a read each call."""
        self.reads += 1
        return {"state": self.state, "exits": {"io": 3}, "uart": {"tx_bytes": 42},
                "block_rootfs": {"read_count": self.reads, "read_bytes": 4096 * self.reads}}


def fake_factory(**kwargs):
    def build(config):
        return FakeMachine(config, **kwargs)
    return build


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket, as Firecracker's clients talk."""

    def __init__(self, path: str, timeout: float = 10.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class ApiClient:
    """One keep-alive connection; ``call`` returns (status, decoded JSON or None)."""

    def __init__(self, path: str):
        self.conn = UnixHTTPConnection(path)

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        return resp.status, (json.loads(payload) if payload else None)

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def serving(tmp_path, **factory_kwargs) -> Iterator[tuple[VmmController, ApiClient]]:
    """A controller with fake machines behind a live API socket."""
    ctl = VmmController(machine_factory=fake_factory(**factory_kwargs))
    server = ApiServer(str(tmp_path / "api.sock"), ctl)
    server.start()
    client = ApiClient(server.path)
    try:
        yield ctl, client
    finally:
        client.close()
        server.close()
        ctl.shutdown()
