"""virtio-vsock (VIRTIO 1.2 5.10) in Firecracker's Unix-socket model, the test driver playing the guest."""

from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.virtio import mmio
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.devices.virtio.vsock import VsockDevice, connection
from ember.devices.virtio.vsock import device as vdev
from ember.devices.virtio.vsock import packet as p
from ember.errors import ConfigError
from ember.eventloop import EventLoop
from ember.memory import GuestMemory
from tests.fakes import ManualLoop, RecordingIrq

RAM = 8 << 20
CID = 3
RX_BUF = 4096 + p.HEADER_SIZE
GUEST_BUF_ALLOC = 256 * 1024


class Guest:
    """The guest's vsock driver, in miniature."""

    def __init__(self, tmp_path, loop=None):
        self.memory = GuestMemory([(0, RAM)])
        self.loop = loop or ManualLoop()
        self.uds = str(tmp_path / "v.sock")
        self.device = VsockDevice(self.loop, CID, self.uds, queue_size=64)
        self.transport = mmio.VirtioMmioTransport(self.device, self.memory, RecordingIrq())
        self.driver = MmioDriver(self.transport, self.memory, BumpAllocator(0x1000, RAM))
        self.rx, self.tx, self.ev = self.driver.start()
        self.rx_bufs = {}
        self.fwd_cnt = 0

    def post_rx(self, count=8, size=RX_BUF):
        for _ in range(count):
            buf = self.driver.buffer(size, write=True)
            self.rx_bufs[self.rx.add_chain([buf])] = buf
        self.driver.kick(vdev.RX_QUEUE)

    def received(self):
        """Packets the device put on the rx queue: [(Header, payload)]."""
        out = []
        for head, written in self.rx.take_used():
            data = self.memory.read(self.rx_bufs.pop(head).gpa, written)
            hdr = p.Header.unpack(data)
            assert hdr.len == written - p.HEADER_SIZE
            assert (hdr.src_cid, hdr.dst_cid, hdr.type) == (p.HOST_CID, CID, p.TYPE_STREAM)
            out.append((hdr, data[p.HEADER_SIZE:]))
            if hdr.op == p.OP_RW:
                self.fwd_cnt += hdr.len
        return out

    def send(self, op, src_port, dst_port, payload=b"", flags=0, buf_alloc=GUEST_BUF_ALLOC, fwd_cnt=None,
             src_cid=CID, dst_cid=p.HOST_CID, length=None, type_=p.TYPE_STREAM, kick=True):
        hdr = p.Header(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length,
                       type_, op, flags, buf_alloc, self.fwd_cnt if fwd_cnt is None else fwd_cnt)
        buffers = [self.driver.buffer(hdr.pack())] + ([self.driver.buffer(payload)] if payload else [])
        self.tx.add_chain(buffers)
        if kick:
            self.driver.kick(vdev.TX_QUEUE)

    def close(self):
        self.transport.close()
        self.memory.close()


@pytest.fixture()
def guest(tmp_path):
    g = Guest(tmp_path)
    g.post_rx(16)
    yield g
    g.close()


def host_connect(guest, port):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(guest.uds)
    sock.sendall(b"CONNECT %d\n" % port)
    guest.loop.pump()
    return sock


def assert_closed(sock):
    """The device closed its end (a reset if it left our bytes unread)."""
    try:
        assert sock.recv(64) == b""
    except ConnectionResetError:
        pass


def ops(packets):
    return [h.op for h, _ in packets]


def open_host_initiated(guest, port=52):
    """Host CONNECT -> guest REQUEST -> guest RESPONSE -> host OK; returns (sock, local port)."""
    sock = host_connect(guest, port)
    ((req, _),) = guest.received()
    assert req.op == p.OP_REQUEST and req.dst_port == port and req.src_port > 1023
    guest.send(p.OP_RESPONSE, port, req.src_port)
    assert sock.recv(64) == b"OK %d\n" % req.src_port
    return sock, req.src_port


def test_config_and_identity(guest):
    assert guest.driver.read32(mmio.REG_DEVICE_ID) == 19
    assert int.from_bytes(guest.transport.read(mmio.REG_CONFIG, 8), "little") == CID
    assert guest.transport.num_queues == 3


def test_bad_cid_and_unusable_path(tmp_path):
    with pytest.raises(ConfigError):
        VsockDevice(ManualLoop(), 2, str(tmp_path / "a.sock"))
    with pytest.raises(ConfigError):
        VsockDevice(ManualLoop(), 3, str(tmp_path / "missing-dir" / "a.sock"))


def test_host_initiated_connection_relays_both_ways(guest):
    sock, local = open_host_initiated(guest)
    sock.sendall(b"hello guest")
    guest.loop.pump()
    ((rw, data),) = guest.received()
    assert (rw.op, rw.src_port, rw.dst_port, data) == (p.OP_RW, local, 52, b"hello guest")
    guest.send(p.OP_RW, 52, local, b"hello host")
    assert sock.recv(64) == b"hello host"
    counts = guest.device.metrics()
    assert (counts["rx_bytes_count"], counts["tx_bytes_count"], counts["conns_added"]) == (11, 10, 1)
    sock.close()
    guest.loop.pump()
    ((shut, _),) = guest.received()
    assert shut.op == p.OP_SHUTDOWN and shut.flags == p.SHUTDOWN_BOTH
    guest.send(p.OP_RST, 52, local)
    assert guest.device.conns == {}


def test_data_after_the_connect_line_is_kept(guest):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(guest.uds)
    sock.sendall(b"CONNECT 7\nearly bytes")
    guest.loop.pump()
    ((req, _),) = guest.received()
    guest.send(p.OP_RESPONSE, 7, req.src_port)
    assert sock.recv(64) == b"OK %d\n" % req.src_port
    guest.loop.pump()
    ((rw, data),) = guest.received()
    assert data == b"early bytes"


def test_guest_refuses_host_connection(guest):
    sock = host_connect(guest, 99)
    ((req, _),) = guest.received()
    guest.send(p.OP_RST, 99, req.src_port)
    assert sock.recv(64) == b""  # closed without OK
    assert guest.device.conns == {}


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"HELLO 5\n", b"CONNECT 99999999999\n", b"A" * 40, b""])
def test_bad_connect_line_closes(guest, line):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(guest.uds)
    if line:
        sock.sendall(line)
    else:
        sock.shutdown(socket.SHUT_WR)
    guest.loop.pump()
    assert_closed(sock)
    assert guest.received() == [] and guest.device.conns == {}


def test_guest_initiated_connection(guest):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(guest.uds + "_52")
    server.listen(1)
    server.settimeout(2)
    guest.send(p.OP_REQUEST, 1234, 52)
    ((resp, _),) = guest.received()
    assert (resp.op, resp.src_port, resp.dst_port) == (p.OP_RESPONSE, 52, 1234)
    assert resp.buf_alloc == connection.CONN_BUF_SIZE
    peer, _ = server.accept()
    peer.settimeout(2)
    guest.send(p.OP_RW, 1234, 52, b"to host")
    assert peer.recv(64) == b"to host"
    peer.sendall(b"to guest")
    guest.loop.pump()
    ((rw, data),) = guest.received()
    assert (rw.op, data) == (p.OP_RW, b"to guest")
    guest.send(p.OP_SHUTDOWN, 1234, 52, flags=p.SHUTDOWN_BOTH)
    assert ops(guest.received()) == [p.OP_RST]
    assert peer.recv(64) == b""
    server.close()


def test_guest_connect_to_missing_socket_is_reset(guest):
    guest.send(p.OP_REQUEST, 1234, 4242)
    ((rst, _),) = guest.received()
    assert (rst.op, rst.src_port, rst.dst_port) == (p.OP_RST, 4242, 1234)
    assert guest.device.stats["host_connect_fails"] == 1


def test_host_to_guest_respects_credit(guest):
    sock = host_connect(guest, 52)
    ((req, _),) = guest.received()
    guest.send(p.OP_RESPONSE, 52, req.src_port, buf_alloc=100, fwd_cnt=0)
    assert sock.recv(64).startswith(b"OK ")
    sock.sendall(os.urandom(1000))
    guest.loop.pump()
    packets = guest.received()
    assert sum(h.len for h, _ in packets if h.op == p.OP_RW) == 100
    assert ops(packets)[-1] == p.OP_CREDIT_REQUEST
    guest.send(p.OP_CREDIT_UPDATE, 52, req.src_port, buf_alloc=100, fwd_cnt=100)
    guest.loop.pump()
    assert sum(h.len for h, _ in guest.received() if h.op == p.OP_RW) == 100


def test_guest_exceeding_our_credit_is_reset(guest, monkeypatch):
    monkeypatch.setattr(connection, "CONN_BUF_SIZE", 1000)
    sock, local = open_host_initiated(guest)
    guest.send(p.OP_RW, 52, local, b"x" * 1500)
    assert ops(guest.received()) == [p.OP_RST]
    assert_closed(sock)


def test_slow_host_reader_gets_everything_and_credit_updates(guest):
    sock, local = open_host_initiated(guest)
    (conn,) = guest.device.conns.values()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the host side fills up early
    blob = os.urandom(600_000)
    sent, got, updates = 0, bytearray(), 0
    guest_view_free = connection.CONN_BUF_SIZE
    while len(got) < len(blob):
        while sent < len(blob) and guest_view_free > 0:
            chunk = blob[sent:sent + min(p.MAX_PAYLOAD, guest_view_free)]
            guest.send(p.OP_RW, 52, local, chunk)
            sent += len(chunk)
            guest_view_free -= len(chunk)
        sock.settimeout(0.5)
        got += sock.recv(65536)
        guest.loop.pump()
        for hdr, _ in guest.received():
            assert hdr.op in (p.OP_CREDIT_UPDATE, p.OP_RW)
            updates += hdr.op == p.OP_CREDIT_UPDATE
            guest_view_free = hdr.buf_alloc - (sent - hdr.fwd_cnt)
        guest.post_rx(2) if len(guest.rx_bufs) < 4 else None
    assert bytes(got) == blob and updates > 0
    assert guest.loop.writers == {} and not conn.pending


def test_guest_half_close_reaches_the_host(guest):
    sock, local = open_host_initiated(guest)
    guest.send(p.OP_RW, 52, local, b"last words")
    guest.send(p.OP_SHUTDOWN, 52, local, flags=p.SHUTDOWN_SEND)
    assert sock.recv(64) == b"last words" and sock.recv(64) == b""
    sock.sendall(b"still talking")  # the other direction stays open
    guest.loop.pump()
    ((rw, data),) = guest.received()
    assert data == b"still talking"


def test_short_rx_chain_needs_reset(tmp_path):
    g = Guest(tmp_path)
    try:
        g.post_rx(1, size=16)  # too small for a packet header
        g.send(p.OP_REQUEST, 1234, 4242)  # answered with an RST that cannot fit
        assert g.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET
    finally:
        g.close()


def test_unknown_connection_and_bad_packets_are_reset_or_dropped(guest):
    guest.send(p.OP_RW, 1, 2, b"data")
    guest.send(p.OP_RST, 1, 2)  # an RST is never answered
    guest.send(p.OP_RW, 1, 2, type_=2)  # SEQPACKET was not negotiated
    guest.send(p.OP_RW, 1, 2, src_cid=7)  # spoofed source: dropped silently
    guest.send(p.OP_RW, 1, 2, b"ab", length=100)  # len beyond the buffer
    assert ops(guest.received()) == [p.OP_RST, p.OP_RST, p.OP_RST]
    assert not guest.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_transport_reset_event(guest):
    buf = guest.driver.buffer(4, write=True)
    head = guest.ev.add_chain([buf])
    assert guest.device.send_transport_reset()
    assert guest.ev.take_used() == [(head, 4)]
    assert guest.memory.read(buf.gpa, 4) == bytes(4)


def test_works_on_the_real_event_loop(tmp_path):
    loop = EventLoop()
    loop.start()
    g = Guest(tmp_path, loop)
    try:
        g.post_rx(8)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(g.uds)
        sock.sendall(b"CONNECT 80\n")
        for _ in range(500):
            if g.rx.used_idx():
                break
            time.sleep(0.01)
        ((req, _),) = g.received()
        g.send(p.OP_RESPONSE, 80, req.src_port)
        assert sock.recv(64) == b"OK %d\n" % req.src_port
        (conn,) = g.device.conns.values()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        blob = os.urandom(200_000)  # more than the socket takes: flushed by the write-retry path
        for offset in range(0, len(blob), p.MAX_PAYLOAD):
            g.send(p.OP_RW, 80, req.src_port, blob[offset:offset + p.MAX_PAYLOAD])
        got = bytearray()
        while len(got) < len(blob):
            got += sock.recv(65536)
        assert bytes(got) == blob
        sock.close()
    finally:
        g.close()
        loop.close()


ops_st = st.sampled_from(sorted(p.KNOWN_OPS) + [0, 8, 255])
packets = st.tuples(ops_st, st.integers(0, 5), st.integers(0, 5), st.binary(max_size=64), st.integers(0, 3),
                    st.sampled_from([CID, 2, 99]), st.sampled_from([2, CID]), st.sampled_from([1, 2]),
                    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                    st.one_of(st.none(), st.integers(0, 200)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(batch=st.lists(packets, max_size=12))
def test_fuzz_hostile_packets(tmp_path, batch):
    g = Guest(tmp_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(g.uds + "_3")
    server.listen(8)
    try:
        g.post_rx(32)
        sock, local = open_host_initiated(g, 4)
        for op, sp, dp, payload, flags, src, dst, typ, alloc, fwd, length in batch:
            g.send(op, sp, dp, payload, flags=flags, src_cid=src, dst_cid=dst, type_=typ,
                   buf_alloc=alloc, fwd_cnt=fwd, length=length)
            g.send(op, 4, local, payload, flags=flags, buf_alloc=alloc, fwd_cnt=fwd, length=length)
            sock.setblocking(False)
            try:
                sock.send(b"host data")
            except OSError:
                pass
            g.loop.pump()
            g.received()
            if len(g.rx_bufs) < 8:
                g.post_rx(8)
        assert not g.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET
    finally:
        server.close()
        g.close()
        os.unlink(g.uds + "_3")
