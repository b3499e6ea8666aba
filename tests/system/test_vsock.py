"""virtio-vsock with a real Linux guest: `ember exec` over vsock, and guest <-> host streams.

One `ember run --vsock UDS` per test (interactive shell on a console file);
the host reaches the guest agent on vsock port 52 with Firecracker's
handshake, and a host server on `UDS_<port>` takes the guest's connections.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ember.agent import exec_in_guest_vsock
from tests.system.vmproc import expect_ember_status

pytestmark = pytest.mark.system
log = logging.getLogger(__name__)

BOOT_TIMEOUT = 240
HOST_PORT = 5000
BLOB_KIB = 1024


@contextmanager
def vsock_vm(tmp_path: Path, *extra: str):
    """Boot the default guest with virtio-vsock; yields the device's Unix socket path."""
    uds = str(tmp_path / "v.sock")
    console = tmp_path / "console.log"
    vm = subprocess.Popen([sys.executable, "-m", "ember", "run", "--no-rig", "--console", f"file:{console}",
                           "--vsock", uds, *extra],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield uds, vm
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()
        if console.exists():
            log.info("guest console:\n%s", console.read_text(errors="replace")[-3000:])


def run(uds: str, command: str, timeout: float = BOOT_TIMEOUT) -> tuple[str, str, int]:
    out, err, status = exec_in_guest_vsock(uds, command, timeout=timeout)
    return out.decode(), err.decode(), status


def test_exec_over_vsock_then_poweroff(tmp_path):
    with vsock_vm(tmp_path, "--vcpus", "2") as (uds, vm):
        started = time.monotonic()
        assert run(uds, "echo out-$((6*7)); echo err >&2; exit 5") == ("out-42\n", "err\n", 5)
        booted = time.monotonic() - started
        t0 = time.monotonic()
        assert run(uds, "nproc") == ("2\n", "", 0)
        print(f"vsock exec: first answer {booted:.1f}s after start, a second exec took {time.monotonic() - t0:.2f}s")
        cli = subprocess.run([sys.executable, "-c", "import sys; from ember.agent import run_command_vsock; "
                              f"sys.exit(run_command_vsock({uds!r}, ['printf', '%s-%s', 'a b', 'c'], 60))"],
                             capture_output=True, text=True, timeout=120)
        assert (cli.returncode, cli.stdout, cli.stderr) == (0, "a b-c", "")
        try:
            run(uds, "poweroff", timeout=30)
        except Exception as exc:  # the guest may power off before the agent answers
            log.info("poweroff exec ended with %s", exc)
        expect_ember_status(vm, 0, 60, tmp_path / "console.log")


class HostServer:
    """A Unix-socket server at UDS_<port>: reads a guest's stream to EOF, answers its length and sha256.

    An empty stream is answered with ``blob`` instead (host -> guest bulk data).
    """

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.received: list[bytes] = []
        self.seconds: list[float] = []  # accept to the guest's EOF
        self.blob = os.urandom(BLOB_KIB * 1024)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                start = time.monotonic()
                data = bytearray()
                while chunk := conn.recv(65536):
                    data += chunk
                self.seconds.append(time.monotonic() - start)
                self.received.append(bytes(data))
                if not data:
                    conn.sendall(self.blob)
                    continue
                conn.sendall(b"host-got %d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode()))

    def close(self) -> None:
        self.sock.close()


def test_guest_program_talks_to_a_host_program(tmp_path):
    with vsock_vm(tmp_path) as (uds, vm):
        server = HostServer(f"{uds}_{HOST_PORT}")
        try:
            out, err, status = run(uds, f"echo hello-from-guest | ember-vsock -c 2 {HOST_PORT}")
            assert (status, err) == (0, ""), out
            assert server.received == [b"hello-from-guest\n"]
            digest = hashlib.sha256(b"hello-from-guest\n").hexdigest()
            assert out == f"host-got 17 {digest}\n"

            script = (f"dd if=/dev/urandom of=/tmp/blob bs=1024 count={BLOB_KIB} 2>/dev/null; "
                      "sha256sum /tmp/blob | cut -d' ' -f1; "
                      f"ember-vsock -c 2 {HOST_PORT} </tmp/blob")
            out, err, status = run(uds, script)
            assert status == 0, err
            guest_sum, answer = out.splitlines()
            assert answer == f"host-got {BLOB_KIB * 1024} {guest_sum}"
            assert hashlib.sha256(server.received[-1]).hexdigest() == guest_sum
            took = server.seconds[-1]
            print(f"vsock guest->host: {BLOB_KIB} KiB in {took * 1000:.0f} ms = {BLOB_KIB / 1024 / took:.2f} MiB/s")
            t0 = time.monotonic()
            out, err, status = run(uds, f"ember-vsock -c 2 {HOST_PORT} </dev/null | sha256sum | cut -d' ' -f1")
            took = time.monotonic() - t0
            assert (out, status) == (hashlib.sha256(server.blob).hexdigest() + "\n", 0), err
            print(f"vsock host->guest: {BLOB_KIB} KiB + sha256 in the guest, exec round trip {took * 1000:.0f} ms")
            out, err, status = run(uds, "ember-vsock -c 2 1 </dev/null; echo rc=$?")  # nobody on UDS_1
            assert out == "rc=1\n" and "ember-vsock: connect" in err
        finally:
            server.close()
            vm.kill()
