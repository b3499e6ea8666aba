"""The virtio-vsock device and its Unix-socket muxer (VIRTIO 1.2 5.10; Firecracker docs/vsock.md).

The guest reaching host CID 2 port P is connected to the Unix socket
`<uds_path>_P`; host programs connect to `<uds_path>`, write "CONNECT P\\n",
and get "OK <host port>\\n" once the guest's port P accepts. Queues: rx (0),
tx (1), event (2). Hostile packets are answered with RST or dropped.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import struct
import threading
from collections import deque

from ember.devices.virtio.buffers import split_views
from ember.devices.virtio.device import VIRTIO_ID_VSOCK, VirtioDevice
from ember.devices.virtio.queue import DescriptorChain, VirtqueueError
from ember.devices.virtio.vsock import packet as p
from ember.devices.virtio.vsock.connection import Connection, State
from ember.errors import ConfigError

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2
DEFAULT_QUEUE_SIZE = 256
CONFIG = struct.Struct("<Q")  # guest_cid (5.10.4)
EVENT_TRANSPORT_RESET = struct.Struct("<I").pack(0)  # struct virtio_vsock_event (5.10.6.6)

CONNECT_LINE = re.compile(rb"CONNECT (\d{1,10})\n")
MAX_CONNECT_LINE = 32
LISTEN_BACKLOG = 128
MAX_CONNECTIONS = 1024
FIRST_LOCAL_PORT = 1024  # host ports we hand out are above the privileged range
MAX_PORT = 0xFFFFFFFF
IDX_MASK = 0xFFFF
RX_BUDGET = 256  # packets to the guest per call before yielding to the loop
TX_BUDGET = 256
WRITE_RETRY_S = 0.005  # when the loop cannot watch for writability


def write_views(views: list[memoryview], data: bytes) -> None:
    for view in views:
        view[:len(data)] = data[:len(view)]
        data = data[len(view):]


class VsockDevice(VirtioDevice):
    """Guest AF_VSOCK streams proxied to host AF_UNIX sockets."""

    device_id = VIRTIO_ID_VSOCK

    def __init__(self, loop, guest_cid: int, uds_path: str, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__([queue_size] * 3, 0)
        if not p.HOST_CID < guest_cid <= MAX_PORT:
            raise ConfigError(f"vsock guest CID {guest_cid} must be 3 to {MAX_PORT}")
        self.loop, self.guest_cid, self.uds_path = loop, guest_cid, uds_path
        self.conns: dict[tuple[int, int], Connection] = {}
        self._control: deque[tuple[int, int, int, int]] = deque()  # local, peer, op, flags
        self._ready: dict[tuple[int, int], Connection] = {}  # host data waiting for the guest
        self._handshakes: set[socket.socket] = set()
        self._next_port = FIRST_LOCAL_PORT
        self._lock = threading.RLock()
        self.stats = dict.fromkeys(("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "conns_opened",
                                    "conns_refused", "rst_sent", "bad_packets", "host_connect_fails"), 0)
        self.listener = self._listen(uds_path)
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.guest_cid)

    def metrics(self) -> dict[str, int]:
        """``stats`` under Firecracker's vsock metric names where it has one."""
        renamed = {"rx_packets": "rx_packets_count", "tx_packets": "tx_packets_count",
                   "rx_bytes": "rx_bytes_count", "tx_bytes": "tx_bytes_count", "conns_opened": "conns_added"}
        return {renamed.get(key, key): value for key, value in self.stats.items()}

    @staticmethod
    def _listen(path: str) -> socket.socket:
        """Bind the host-initiated socket, replacing a stale one left by an earlier run."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on vsock socket {path}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            for conn in list(self.conns.values()):
                self._drop(conn)
            self._control.clear()
            super().reset()

    def close(self) -> None:
        with self._lock:
            self.reset()
            for sock in list(self._handshakes):
                self._end_handshake(sock)
            if self.listener.fileno() >= 0:
                self.loop.remove_reader(self.listener.fileno())
                self.listener.close()
                try:
                    os.unlink(self.uds_path)
                except OSError:
                    pass

    def send_transport_reset(self) -> bool:
        """Tell the guest every connection is gone (after a snapshot restore, 5.10.6.6)."""
        with self._lock:
            queue = self.queues[EVENT_QUEUE] if self.queues else None
            chain = queue.pop() if queue else None
            if chain is None or chain.writable_len < len(EVENT_TRANSPORT_RESET):
                return False
            write_views(chain.writable, EVENT_TRANSPORT_RESET)
            queue.push_used(chain.head, len(EVENT_TRANSPORT_RESET))
        self.signal_used(EVENT_QUEUE)
        return True

    def process_queue(self, index: int) -> None:
        with self._lock:
            if index == TX_QUEUE:
                self._transmit()
            if index in (RX_QUEUE, TX_QUEUE):
                self._receive()

    # -- host-initiated connections (the listener) -------------------------------------------
    def _accept(self) -> None:
        with self._lock:
            while True:
                try:
                    sock, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.warning("vsock: accept on %s failed: %s", self.uds_path, exc.strerror)
                    return
                sock.setblocking(False)
                self._handshakes.add(sock)
                self.loop.add_reader(sock.fileno(), lambda s=sock: self._handshake(s))

    def _handshake(self, sock: socket.socket) -> None:
        """Read "CONNECT <port>\\n" without consuming any data that follows it."""
        with self._lock:
            if sock not in self._handshakes:
                return
            try:
                head = sock.recv(MAX_CONNECT_LINE, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                head = b""
            newline = head.find(b"\n")
            if newline < 0 and head and len(head) < MAX_CONNECT_LINE:
                return  # wait for the rest of the line
            line = sock.recv(newline + 1) if newline >= 0 else b""
            match = CONNECT_LINE.fullmatch(line)
            port = int(match.group(1)) if match else -1
            self._end_handshake(sock, keep=0 <= port <= MAX_PORT)
            if 0 <= port <= MAX_PORT:
                self._connect_guest(sock, port)
        self.kick(RX_QUEUE)

    def _end_handshake(self, sock: socket.socket, keep: bool = False) -> None:
        self._handshakes.discard(sock)
        self.loop.remove_reader(sock.fileno())
        if not keep:
            sock.close()

    def _connect_guest(self, sock: socket.socket, port: int) -> None:
        if not self.queues or len(self.conns) >= MAX_CONNECTIONS:
            log.info("vsock: host connect to guest port %d refused (driver not ready or too many)", port)
            self.stats["conns_refused"] += 1
            sock.close()
            return
        local = self._allocate_port()
        conn = Connection(local, port, sock, State.CONNECTING)
        self.conns[conn.key] = conn
        self._queue(conn.key, p.OP_REQUEST)

    def _allocate_port(self) -> int:
        used = {local for local, _ in self.conns}
        while self._next_port in used:
            self._next_port = self._next_port + 1 if self._next_port < MAX_PORT else FIRST_LOCAL_PORT
        port = self._next_port
        self._next_port = port + 1 if port < MAX_PORT else FIRST_LOCAL_PORT
        return port

    # -- host sockets ------------------------------------------------------------------------
    def _arm(self, conn: Connection) -> None:
        """Watch the host socket; only while the guest has credit and wants our data."""
        if conn.reading or conn.closed or conn.guest_shut_rcv or conn.key in self._ready:
            return
        if conn.peer_credit() and conn.state is State.ESTABLISHED:
            conn.reading = True
            self.loop.add_reader(conn.fd, lambda: self._host_readable(conn))

    def _disarm(self, conn: Connection) -> None:
        if conn.reading:
            conn.reading = False
            self.loop.remove_reader(conn.fd)

    def _host_readable(self, conn: Connection) -> None:
        with self._lock:
            if conn.closed:
                return
            self._disarm(conn)
            self._ready[conn.key] = conn
        self.kick(RX_QUEUE)

    def _watch_writable(self, conn: Connection) -> None:
        """Come back when the host socket may take more (or soon, if the loop cannot say)."""
        if conn.writing or conn.closed:
            return
        conn.writing = True
        add_writer = getattr(self.loop, "add_writer", None)
        if add_writer is not None:
            add_writer(conn.fd, lambda: self._host_writable(conn))
        else:
            timer = threading.Timer(WRITE_RETRY_S, self.loop.call_soon_threadsafe,
                                    args=(lambda: self._host_writable(conn),))
            timer.daemon = True
            timer.start()

    def _host_writable(self, conn: Connection) -> None:
        with self._lock:
            if conn.closed or not conn.writing:
                return
            conn.writing = False
            remove_writer = getattr(self.loop, "remove_writer", None)
            if remove_writer is not None:
                remove_writer(conn.fd)
            self._flush(conn)
        self.kick(RX_QUEUE)

    def _flush(self, conn: Connection) -> None:
        try:
            conn.flush()
        except OSError as exc:
            self._reset(conn, f"host socket write failed: {exc.strerror}")
            return
        if conn.pending:
            self._watch_writable(conn)
            return
        if conn.shut_host_write:
            self._half_close(conn)
        if conn.credit_update_due():
            self._queue(conn.key, p.OP_CREDIT_UPDATE)

    @staticmethod
    def _half_close(conn: Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- connection table ----------------------------------------------------------------------
    def _queue(self, key: tuple[int, int], op: int, flags: int = 0) -> None:
        self._control.append((key[0], key[1], op, flags))

    def _drop(self, conn: Connection) -> None:
        self._disarm(conn)
        if conn.writing and hasattr(self.loop, "remove_writer"):
            self.loop.remove_writer(conn.fd)
        conn.writing = False
        self._ready.pop(conn.key, None)
        self.conns.pop(conn.key, None)
        conn.close()

    def _reset(self, conn: Connection, why: str) -> None:
        log.debug("vsock: reset %d<->%d: %s", conn.local_port, conn.peer_port, why)
        self._queue(conn.key, p.OP_RST)
        self._drop(conn)

    def _header(self, local: int, peer: int, op: int, flags: int = 0, length: int = 0) -> p.Header:
        conn = self.conns.get((local, peer))
        buf_alloc, fwd_cnt = (conn.buf_alloc, conn.fwd_cnt) if conn else (0, 0)
        if conn:
            conn.last_fwd_cnt_sent = fwd_cnt
        return p.Header(p.HOST_CID, self.guest_cid, local, peer, length, p.TYPE_STREAM, op, flags,
                        buf_alloc, fwd_cnt)

    # -- guest -> host (tx queue) -----------------------------------------------------------------
    def _transmit(self) -> None:
        self.consume_chains(TX_QUEUE, self._handle_tx, budget=TX_BUDGET, loop=self.loop)

    def _handle_tx(self, chain: DescriptorChain) -> None:
        header_views, rest = split_views(chain.readable, p.HEADER_SIZE)
        if sum(map(len, header_views)) < p.HEADER_SIZE:
            self._bad(f"tx packet of {chain.readable_len} bytes, shorter than a header")
            return
        hdr = p.Header.unpack(b"".join(header_views))
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != p.HOST_CID:
            self._bad(f"packet from CID {hdr.src_cid} to CID {hdr.dst_cid}")
            return
        payload, _ = split_views(rest, hdr.len)
        if hdr.len > p.MAX_PAYLOAD or sum(map(len, payload)) < hdr.len or hdr.type != p.TYPE_STREAM \
                or hdr.op not in p.KNOWN_OPS:
            self._bad(f"bad packet: op {hdr.op} type {hdr.type} len {hdr.len}")
            self._refuse(hdr)
            return
        self.stats["tx_packets"] += 1
        self._dispatch(hdr, payload)

    def _bad(self, why: str) -> None:
        self.stats["bad_packets"] += 1
        log.debug("vsock: %s", why)

    def _refuse(self, hdr: p.Header) -> None:
        """RST the sender's port pair (never in answer to an RST) and drop any connection on it."""
        key = (hdr.dst_port, hdr.src_port)
        conn = self.conns.get(key)
        if conn is not None:
            self._drop(conn)
        if hdr.op != p.OP_RST:
            self._queue(key, p.OP_RST)
            self.stats["rst_sent"] += 1

    def _dispatch(self, hdr: p.Header, payload: list[memoryview]) -> None:
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if hdr.op == p.OP_REQUEST:
            self._guest_connect(hdr, conn)
            return
        if conn is None:
            self._refuse(hdr)
            return
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        handler = {p.OP_RESPONSE: self._on_response, p.OP_RST: self._on_rst, p.OP_SHUTDOWN: self._on_shutdown,
                   p.OP_RW: self._on_rw, p.OP_CREDIT_UPDATE: self._on_credit_update,
                   p.OP_CREDIT_REQUEST: self._on_credit_request}[hdr.op]
        handler(conn, hdr, payload)

    def _guest_connect(self, hdr: p.Header, existing: Connection | None) -> None:
        """The guest connects to host port P: dial <uds_path>_P, answer RESPONSE or RST."""
        if existing is not None or len(self.conns) >= MAX_CONNECTIONS:
            self._refuse(hdr)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{hdr.dst_port}")
        except OSError as exc:
            sock.close()
            log.debug("vsock: guest connect to port %d: %s", hdr.dst_port, exc.strerror or exc)
            self.stats["host_connect_fails"] += 1
            self._refuse(hdr)
            return
        conn = Connection(hdr.dst_port, hdr.src_port, sock, State.ESTABLISHED)
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self.conns[conn.key] = conn
        self.stats["conns_opened"] += 1
        self._queue(conn.key, p.OP_RESPONSE)
        self._arm(conn)

    def _on_response(self, conn: Connection, hdr: p.Header, payload: list[memoryview]) -> None:
        if conn.state is not State.CONNECTING:
            self._reset(conn, "unexpected RESPONSE")
            return
        try:
            conn.sock.send(b"OK %d\n" % conn.local_port)
        except OSError as exc:
            self._reset(conn, f"host went away before OK: {exc.strerror}")
            return
        conn.state = State.ESTABLISHED
        self.stats["conns_opened"] += 1
        self._arm(conn)

    def _on_rst(self, conn: Connection, hdr: p.Header, payload: list[memoryview]) -> None:
        self._drop(conn)

    def _on_shutdown(self, conn: Connection, hdr: p.Header, payload: list[memoryview]) -> None:
        if hdr.flags & p.SHUTDOWN_BOTH == p.SHUTDOWN_BOTH or conn.state is not State.ESTABLISHED:
            self._flush_quietly(conn)
            self._reset(conn, "guest shut down both directions")
            return
        if hdr.flags & p.SHUTDOWN_RCV:
            conn.guest_shut_rcv = True
            self._disarm(conn)
            self._ready.pop(conn.key, None)
        if hdr.flags & p.SHUTDOWN_SEND:
            conn.shut_host_write = True
            if not conn.pending:
                self._half_close(conn)

    def _flush_quietly(self, conn: Connection) -> None:
        try:
            conn.flush()
        except OSError:
            pass

    def _on_rw(self, conn: Connection, hdr: p.Header, payload: list[memoryview]) -> None:
        if conn.state is not State.ESTABLISHED or conn.shut_host_write:
            return  # closing: the guest will see our SHUTDOWN/RST
        if hdr.len > conn.free_space():
            self._reset(conn, f"guest sent {hdr.len} bytes with {conn.free_space()} credit")
            return
        if hdr.len:
            try:
                conn.forward(payload)
            except OSError as exc:
                self._reset(conn, f"host socket write failed: {exc.strerror}")
                return
            self.stats["tx_bytes"] += hdr.len
        if conn.pending:
            self._watch_writable(conn)
        elif conn.credit_update_due():
            self._queue(conn.key, p.OP_CREDIT_UPDATE)
        self._arm(conn)

    def _on_credit_update(self, conn: Connection, hdr: p.Header, payload: list[memoryview]) -> None:
        self._arm(conn)  # the guest's credit is fresh (update_peer ran)

    def _on_credit_request(self, conn: Connection, hdr: p.Header, payload: list[memoryview]) -> None:
        self._queue(conn.key, p.OP_CREDIT_UPDATE)
        self._arm(conn)

    # -- host -> guest (rx queue) ------------------------------------------------------------------
    def _receive(self) -> None:
        queue, sent = self.queues[RX_QUEUE], 0
        try:
            while sent < RX_BUDGET and (self._control or self._ready):
                chain = queue.pop()
                if chain is None:
                    break
                if chain.writable_len < p.HEADER_SIZE:
                    raise VirtqueueError(f"vsock rx chain of {chain.writable_len} writable bytes")
                written = self._fill(chain)
                if written is None:
                    queue.undo_pop(1)
                    continue
                queue.push_used(chain.head, written)
                sent += 1
        finally:
            if sent:
                self.signal_used(RX_QUEUE)
        if sent == RX_BUDGET:
            self.loop.call_soon_threadsafe(lambda: self.kick(RX_QUEUE))

    def _fill(self, chain: DescriptorChain) -> int | None:
        """Write one packet into the chain: a control packet first, else host data."""
        header_views, payload_views = split_views(chain.writable, p.HEADER_SIZE)
        if self._control:
            local, peer, op, flags = self._control.popleft()
            if op == p.OP_SHUTDOWN and (local, peer) in self.conns:
                self.conns[(local, peer)].state = State.CLOSING
            write_views(header_views, self._header(local, peer, op, flags).pack())
            self.stats["rx_packets"] += 1
            return p.HEADER_SIZE
        key, conn = next(iter(self._ready.items()))
        length = self._read_host(conn, payload_views)
        if length is None:
            return None
        write_views(header_views, self._header(key[0], key[1], p.OP_RW, length=length).pack())
        conn.sent(length)
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += length
        return p.HEADER_SIZE + length

    def _read_host(self, conn: Connection, views: list[memoryview]) -> int | None:
        """Host bytes straight into the guest's buffer, up to its credit; None if none came."""
        room = min(conn.peer_credit(), p.MAX_PAYLOAD, sum(map(len, views)))
        if room == 0:
            self._ready.pop(conn.key, None)
            if not conn.peer_credit() and not conn.credit_requested:
                conn.credit_requested = True
                self._queue(conn.key, p.OP_CREDIT_REQUEST)
            return None
        try:
            n, *_ = conn.sock.recvmsg_into(split_views(views, room)[0])
        except BlockingIOError:
            n = -1
        except OSError as exc:
            self._reset(conn, f"host socket read failed: {exc.strerror}")
            return None
        if n > 0:
            return n
        self._ready.pop(conn.key, None)
        if n == 0:  # the host hung up: tell the guest, then wait for its RST
            self._queue(conn.key, p.OP_SHUTDOWN, p.SHUTDOWN_BOTH)
        else:
            self._arm(conn)
        return None
