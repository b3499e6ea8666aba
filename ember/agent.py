"""The host side of the guest agent: run a command in a running guest.

The default guest's agent listens on its second serial port (COM2). The VMM
bridges that port to a Unix socket (``AgentBridge``, on the event loop);
``ember exec`` connects there and speaks the agent's line protocol
(``ember.images.agent_protocol``): one request, then stdout, stderr and the
exit status come back. With virtio-vsock the same agent also listens on guest
vsock port 52; the host reaches it through the device's Unix socket with
Firecracker's handshake (docs/vsock.md: "CONNECT <port>\\n" -> "OK <n>\\n").
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from ember.errors import EmberError

log = logging.getLogger(__name__)
READY_LINE = b"READY 0 "
VSOCK_AGENT_PORT = 52
MAX_HANDSHAKE_LINE = 64
RETRY_S = 0.1


class AgentBridge:
    """Bridges one Unix-socket client at a time to the agent's serial port.

    Requests sent before the agent announced itself are held back until its
    READY line: the guest's serial driver drops what arrived before it opened.
    """

    def __init__(self, path: str, loop, to_guest) -> None:
        self.path = path
        self._loop = loop
        self._to_guest = to_guest
        self._client: socket.socket | None = None
        self._ready = False  # the agent announced itself (READY): earlier input would be lost
        self._held = bytearray()
        self._seen = b""
        if os.path.exists(path):
            os.unlink(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self._server.bind(path)
        self._server.listen(4)
        loop.add_reader(self._server.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._server.accept()
        except BlockingIOError:
            return
        if self._client is not None:
            conn.close()  # one exec at a time
            return
        conn.setblocking(False)
        self._client = conn
        self._loop.add_reader(conn.fileno(), self._from_client)

    def _from_client(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            data = client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if self._ready and not self._held:
                self._to_guest(data)
            else:
                self._held += data
            return
        self._loop.remove_reader(client.fileno())
        client.close()
        self._client = None

    def guest_output(self, data: bytes) -> None:
        """Called on a vCPU thread with bytes the agent wrote to its port."""
        if not self._ready:
            self._seen = (self._seen + data)[-64:]
            if READY_LINE in self._seen:
                self._ready = True
                self._loop.call_soon_threadsafe(self._release_held)
        client = self._client
        if client is None:
            return
        try:
            client.sendall(data)
        except OSError:
            log.debug("agent client went away")

    def _release_held(self) -> None:
        held, self._held = bytes(self._held), bytearray()
        if held:
            self._to_guest(held)

    def close(self) -> None:
        self._loop.remove_reader(self._server.fileno())
        self._server.close()
        if self._client is not None:
            self._client.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def exec_in_guest(sock_path: str, command: str, *, timeout: float = 60.0) -> tuple[bytes, bytes, int]:
    """Run ``command`` through the agent; returns (stdout, stderr, exit status)."""
    from ember.images import agent_protocol as proto

    deadline = time.monotonic() + timeout
    conn = _connect(sock_path, deadline)
    request_id = os.getpid() & 0xFFFF
    with conn:
        conn.sendall(proto.encode_request(request_id, command))
        return _collect_reply(conn, request_id, deadline)


def _connect(path: str, deadline: float) -> socket.socket:
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError) as err:
            conn.close()
            if time.monotonic() > deadline:
                raise EmberError(f"cannot reach the guest agent at {path}: {err.strerror}") from None
            time.sleep(0.1)


def _collect_reply(conn: socket.socket, request_id: int, deadline: float,
                   buffer: bytes = b"") -> tuple[bytes, bytes, int]:
    from ember.images import agent_protocol as proto

    collector = proto.ExecCollector(request_id)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EmberError("the guest agent did not answer in time")
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            raise EmberError("the guest agent closed the connection")
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                reply = proto.parse_reply(line)
            except proto.AgentProtocolError:
                log.debug("ignoring agent line %r", line[:80])
                continue
            result = collector.feed(reply)
            if result is not None:
                return result.stdout, result.stderr, result.status


class HandshakeRefused(ConnectionError):
    """The vsock device closed the connection before "OK": nobody listens on that guest port yet."""


def vsock_handshake(conn: socket.socket, port: int, deadline: float) -> bytes:
    """Send "CONNECT <port>\\n", read the "OK <n>\\n" answer; returns bytes that came after it."""
    conn.sendall(b"CONNECT %d\n" % port)
    buffer = b""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EmberError(f"the vsock device did not answer CONNECT {port} in time")
        conn.settimeout(left)
        try:
            chunk = conn.recv(MAX_HANDSHAKE_LINE)
        except socket.timeout:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise HandshakeRefused(f"guest vsock port {port} refused the connection")
        buffer += chunk
        if len(buffer) > MAX_HANDSHAKE_LINE and b"\n" not in buffer:
            break
    line, rest = buffer.split(b"\n", 1) if b"\n" in buffer else (buffer, b"")
    parts = line.split(b" ")
    if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
        raise EmberError(f"unexpected vsock handshake answer {line[:40]!r}")
    return rest


def connect_vsock(uds_path: str, port: int, deadline: float) -> tuple[socket.socket, bytes]:
    """Connect to guest vsock ``port`` through the device's Unix socket, retrying until it listens.

    Returns the connected socket and any bytes received right after the handshake.
    """
    while True:
        conn = _connect(uds_path, deadline)
        try:
            return conn, vsock_handshake(conn, port, deadline)
        except HandshakeRefused as err:
            conn.close()
            if time.monotonic() + RETRY_S > deadline:
                raise EmberError(f"cannot reach the guest agent through {uds_path}: {err}") from None
            time.sleep(RETRY_S)
        except BaseException:
            conn.close()
            raise


def exec_in_guest_vsock(uds_path: str, command: str, *, port: int = VSOCK_AGENT_PORT,
                        timeout: float = 60.0) -> tuple[bytes, bytes, int]:
    """Run ``command`` through the agent on guest vsock ``port``; returns (stdout, stderr, status)."""
    from ember.images import agent_protocol as proto

    deadline = time.monotonic() + timeout
    conn, early = connect_vsock(uds_path, port, deadline)
    request_id = os.getpid() & 0xFFFF
    with conn:
        conn.sendall(proto.encode_request(request_id, command))
        return _collect_reply(conn, request_id, deadline, early)


def _command_text(command: list[str], usage: str) -> str:
    import shlex

    if not command:
        raise EmberError(f"no command given: {usage}")
    return command[0] if len(command) == 1 else shlex.join(command)


def _print_result(out: bytes, err: bytes) -> None:
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.flush()


def run_command(sock_path: str, command: list[str], *, timeout: float = 60.0) -> int:
    """`ember exec --agent-sock`: print the guest command's output, return its status."""
    text = _command_text(command, "ember exec --agent-sock PATH -- COMMAND")
    out, err, status = exec_in_guest(sock_path, text, timeout=timeout)
    _print_result(out, err)
    return status


def run_command_vsock(uds_path: str, command: list[str], timeout: float = 60.0, *,
                      port: int = VSOCK_AGENT_PORT) -> int:
    """`ember exec --vsock`: the same over the guest's vsock agent."""
    text = _command_text(command, "ember exec --vsock UDS_PATH -- COMMAND")
    out, err, status = exec_in_guest_vsock(uds_path, text, port=port, timeout=timeout)
    _print_result(out, err)
    return status
