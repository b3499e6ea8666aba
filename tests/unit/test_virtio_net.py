"""virtio-net (VIRTIO 1.2 5.1) through the MMIO transport, on a socket-pair TAP and a real TAP."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.backends.tap import Tap
from ember.devices.virtio import mmio, net
from ember.devices.virtio.net import NET_HDR_SIZE, NetDevice
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.errors import ConfigError
from ember.eventloop import EventLoop
from ember.memory import GuestMemory
from tests import fakes
from tests.fakes import RecordingIrq

RAM = 4 << 20
MAC = "52:54:00:12:34:56"
ETHERTYPE_TEST = 0x88B5  # IEEE local experimental: nothing else on the wire uses it
ALL_FEATURES = None
NO_MERGE = object()


class ManualLoop(fakes.ManualLoop):
    ROUNDS = 50  # frames come in bounded bursts: a device still busy after 50 rounds is spinning


class FakeTap(Tap):
    """A TAP stand-in: one end of a SOCK_SEQPACKET pair keeps frame boundaries."""

    def __init__(self):
        self.peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.peer.settimeout(2)
        self._sock = ours
        super().__init__(ours.detach(), "fake0", created=False)
        self.offload = None

    def set_offload(self, flags):
        self.offload = flags


class Rig:
    def __init__(self, features=ALL_FEATURES, tap=None, queue_size=None, loop=None):
        self.memory = GuestMemory([(0, RAM)])
        self.loop = loop or ManualLoop()
        self.tap = tap or FakeTap()
        self.irq = RecordingIrq()
        self.device = NetDevice(self.loop, self.tap, mac=MAC)
        self.transport = mmio.VirtioMmioTransport(self.device, self.memory, self.irq)
        self.driver = MmioDriver(self.transport, self.memory, BumpAllocator(0x1000, RAM))
        if features is NO_MERGE:
            features = self.driver_features() & ~net.VIRTIO_NET_F_MRG_RXBUF
        self.rx, self.tx = self.driver.start(features, queue_size)

    def driver_features(self):
        self.driver.write32(mmio.REG_STATUS, 0)
        return self.driver.device_features()

    def post_rx(self, *sizes):
        buffers = [self.driver.buffer(size, write=True) for size in sizes]
        for buf in buffers:
            self.rx.add_chain([buf])
        return buffers

    def send(self, payload, split=None):
        """The guest transmits one frame (zero vnet header + payload)."""
        data = bytes(NET_HDR_SIZE) + payload
        split = split or [len(data)]
        parts, offset = [], 0
        for size in split:
            parts.append(self.driver.buffer(data[offset:offset + size]))
            offset += size
        head = self.tx.add_chain(parts)
        self.driver.kick(net.TX_QUEUE)
        return head

    def close(self):
        self.transport.close()
        if isinstance(self.tap, FakeTap):
            self.tap.peer.close()
        self.memory.close()


@pytest.fixture()
def rig():
    r = Rig()
    yield r
    r.close()


def frame(payload: bytes, dst=b"\xff" * 6, src=b"\x02\0\0\0\0\1") -> bytes:
    return dst + src + struct.pack(">H", ETHERTYPE_TEST) + payload


def test_identity_and_config(rig):
    assert rig.driver.read32(mmio.REG_DEVICE_ID) == 1
    config = rig.transport.read(mmio.REG_CONFIG, 8) + rig.transport.read(mmio.REG_CONFIG + 8, 2)
    mac, status, pairs = net.CONFIG.unpack(config)
    assert net.format_mac(mac) == MAC and status == net.VIRTIO_NET_S_LINK_UP and pairs == 1
    assert rig.device.acked_features & net.VIRTIO_NET_F_MRG_RXBUF
    assert rig.tap.offload == (net.TUN_F_CSUM | net.TUN_F_TSO4 | net.TUN_F_TSO6 | net.TUN_F_TSO_ECN)


def test_random_mac_is_local_unicast():
    mac = net.parse_mac(None)
    assert len(mac) == 6 and mac[0] & 0x02 and not mac[0] & 0x01
    for bad in ("52:54:00:12:34", "zz:54:00:12:34:56", "525400123456", "52:54:00:12:34:567"):
        with pytest.raises(ConfigError):
            net.parse_mac(bad)


def test_transmit_reaches_the_tap_with_its_header(rig):
    payload = frame(b"hello from the guest" * 10)
    head = rig.send(payload, split=[NET_HDR_SIZE, 20, 10_000])
    assert rig.tap.peer.recv(70000) == bytes(NET_HDR_SIZE) + payload
    assert rig.tx.take_used() == [(head, 0)]
    assert rig.device.tx_packets == 1 and rig.device.tx_bytes == len(payload)
    assert rig.irq.count == 1


def test_receive_into_one_buffer(rig):
    (buf,) = rig.post_rx(2048)
    rig.driver.kick(net.RX_QUEUE)
    hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 0)  # NEEDS_CSUM passes through
    rig.tap.peer.send(hdr + frame(b"x" * 100))
    rig.loop.pump()
    ((head, written),) = rig.rx.take_used()
    got = rig.memory.read(buf.gpa, written)
    assert written == NET_HDR_SIZE + 114
    assert got[:10] == hdr[:10] and struct.unpack_from("<H", got, 10)[0] == 1
    assert got[NET_HDR_SIZE:] == frame(b"x" * 100)
    assert rig.device.rx_packets == 1 and rig.irq.count >= 1


def test_mergeable_frame_spans_several_chains(rig):
    bufs = rig.post_rx(1024, 1024, 1024, 1024)
    rig.driver.kick(net.RX_QUEUE)
    payload = frame(os.urandom(2900))
    rig.tap.peer.send(bytes(NET_HDR_SIZE) + payload)
    rig.loop.pump()
    used = rig.rx.take_used()
    assert [w for _, w in used] == [1024, 1024, NET_HDR_SIZE + len(payload) - 2048]
    data = b"".join(rig.memory.read(b.gpa, w) for b, (_, w) in zip(bufs, used, strict=False))
    assert struct.unpack_from("<H", data, 10)[0] == 3
    assert data[NET_HDR_SIZE:] == payload


def test_a_frame_over_several_buffers_is_published_at_once(rig, monkeypatch):
    """VIRTIO 1.2 5.1.6.4.2: the driver must never see some of a frame's buffers used and
    not the rest (Linux drops such a frame and takes the rest for a new one). The used
    index moves once, past all three, after their elements are in place."""
    queue, published = rig.device.queues[net.RX_QUEUE], []
    store = queue._publish_used_idx

    def watched(index):
        ring = [rig.memory.read_u32(rig.rx.used + 4 + 8 * i) for i in range(index)]
        published.append((index, ring))
        store(index)

    monkeypatch.setattr(queue, "_publish_used_idx", watched)
    bufs = rig.post_rx(1024, 1024, 1024)
    rig.driver.kick(net.RX_QUEUE)
    rig.tap.peer.send(bytes(NET_HDR_SIZE) + frame(os.urandom(2900)))
    rig.loop.pump()
    heads = [head for head, _ in rig.rx.take_used()]
    assert len(heads) == 3 == len(bufs)
    assert published == [(3, heads)]


def test_receive_waits_for_buffers(rig):
    rig.tap.peer.send(bytes(NET_HDR_SIZE) + frame(b"early"))
    rig.loop.pump()
    assert rig.tap.fd not in rig.loop.readers, "TAP still watched with no rx buffers"
    assert rig.rx.take_used() == [] and rig.device.rx_dropped == 0
    buf, _ = rig.post_rx(2048, 2048)
    rig.driver.kick(net.RX_QUEUE)
    rig.loop.pump()
    ((_, written),) = rig.rx.take_used()
    assert rig.memory.read(buf.gpa + NET_HDR_SIZE, written - NET_HDR_SIZE) == frame(b"early")
    assert rig.tap.fd in rig.loop.readers, "a buffer is left, so the TAP is watched again"


def test_mergeable_frame_waits_for_enough_chains(rig):
    first = rig.post_rx(1024)
    rig.driver.kick(net.RX_QUEUE)
    payload = frame(os.urandom(2500))
    rig.tap.peer.send(bytes(NET_HDR_SIZE) + payload)
    rig.loop.pump()
    assert rig.rx.take_used() == []
    rest = rig.post_rx(1024, 1024)
    rig.driver.kick(net.RX_QUEUE)
    rig.loop.pump()
    used = rig.rx.take_used()
    assert len(used) == 3
    data = b"".join(rig.memory.read(b.gpa, w) for b, (_, w) in zip(first + rest, used, strict=True))
    assert data[NET_HDR_SIZE:] == payload


def test_without_mergeable_buffers_big_frames_are_dropped():
    r = Rig(NO_MERGE)
    try:
        assert not r.device.mergeable
        (buf,) = r.post_rx(600)
        r.driver.kick(net.RX_QUEUE)
        r.tap.peer.send(bytes(NET_HDR_SIZE) + frame(b"b" * 1000))
        r.tap.peer.send(bytes(NET_HDR_SIZE) + frame(b"small"))
        r.loop.pump()
        ((_, written),) = r.rx.take_used()
        got = r.memory.read(buf.gpa, written)
        assert got[NET_HDR_SIZE:] == frame(b"small") and struct.unpack_from("<H", got, 10)[0] == 1
        assert r.device.rx_dropped == 1
    finally:
        r.close()


def test_short_rx_chain_needs_reset(rig):
    rig.rx.add_chain([rig.driver.buffer(8, write=True)])
    rig.driver.kick(net.RX_QUEUE)
    rig.tap.peer.send(bytes(NET_HDR_SIZE) + frame(b"x"))
    rig.loop.pump()
    assert rig.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_short_tx_chain_needs_reset(rig):
    rig.tx.add_chain([rig.driver.buffer(b"abcd")])
    rig.driver.kick(net.TX_QUEUE)
    assert rig.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_tx_budget_yields_to_the_loop(rig, monkeypatch):
    monkeypatch.setattr(net, "TX_BUDGET", 8)
    for i in range(net.TX_BUDGET + 3):
        rig.tx.add_chain([rig.driver.buffer(bytes(NET_HDR_SIZE) + frame(bytes([i % 256])))])
    rig.driver.kick(net.TX_QUEUE)
    assert len(rig.tx.take_used()) == net.TX_BUDGET
    rig.loop.pump()
    assert len(rig.tx.take_used()) == 3
    assert rig.device.tx_packets == net.TX_BUDGET + 3


def test_reset_stops_watching_the_tap(rig):
    assert rig.tap.fd in rig.loop.readers
    rig.driver.write32(mmio.REG_STATUS, 0)
    assert rig.tap.fd not in rig.loop.readers


buffer_lists = st.lists(st.tuples(st.integers(0, 3000), st.booleans()), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(buffer_lists, min_size=1, max_size=4))
def test_fuzz_tx_chains(chains):
    r = Rig(queue_size=16)
    try:
        for spec in chains:
            r.tx.add_chain([r.driver.buffer(os.urandom(n) if not w else n, write=w) for n, w in spec])
        r.driver.kick(net.TX_QUEUE)
        r.tap.peer.setblocking(False)
        sent = []
        while True:
            try:
                sent.append(r.tap.peer.recv(70000))
            except BlockingIOError:
                break
        for data in sent:
            assert len(data) >= NET_HDR_SIZE
        if not r.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET:
            assert len(sent) == len(chains)
    finally:
        r.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(st.lists(st.integers(0, 1600), min_size=1, max_size=3), min_size=1, max_size=5),
       sizes=st.lists(st.integers(NET_HDR_SIZE, 3000), min_size=1, max_size=4), merge=st.booleans())
def test_fuzz_rx_chains(chains, sizes, merge):
    r = Rig(None if merge else NO_MERGE, queue_size=16)
    try:
        posted = {}
        for spec in chains:
            bufs = [r.driver.buffer(n, write=True) for n in spec]
            posted[r.rx.add_chain(bufs)] = bufs
        r.driver.kick(net.RX_QUEUE)
        frames = [os.urandom(n) for n in sizes]
        for f in frames:
            r.tap.peer.send(f)
        r.loop.pump()
        used = r.rx.take_used()
        if r.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET:
            assert any(sum(spec) < NET_HDR_SIZE for spec in chains)
            return
        got = []
        while used:
            head, written = used[0]
            data = b"".join(r.memory.read(b.gpa, b.length) for b in posted[head])[:written]
            count = struct.unpack_from("<H", data, 10)[0]
            assert count == 1 or merge
            for h, w in used[1:count]:
                data += b"".join(r.memory.read(b.gpa, b.length) for b in posted[h])[:w]
            got.append(data)
            used = used[count:]
        # Delivered frames come in order, some maybe dropped; num_buffers is the device's to write.
        remaining = iter(f[:10] + f[12:] for f in frames)
        for g in got:
            assert any(g[:10] + g[12:] == f for f in remaining)
        assert len(got) + r.device.rx_dropped <= len(frames)
    finally:
        r.close()


def test_on_the_real_event_loop():
    loop = EventLoop()
    loop.start()
    r = Rig(loop=loop)
    try:
        (buf,) = r.post_rx(2048)
        r.driver.kick(net.RX_QUEUE)
        r.tap.peer.send(bytes(NET_HDR_SIZE) + frame(b"async"))
        deadline = time.monotonic() + 5
        while not r.rx.used_idx() and time.monotonic() < deadline:
            time.sleep(0.01)
        ((_, written),) = r.rx.take_used()
        assert r.memory.read(buf.gpa + NET_HDR_SIZE, written - NET_HDR_SIZE) == frame(b"async")
    finally:
        r.close()
        loop.close()


# -- a real TAP, inside a private network namespace ------------------------------------------------
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003


def in_new_netns(fn):
    """Run fn in a thread moved into a fresh network namespace (the namespace
    lives on in the sockets and TAP fds it opens)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = {}

    def body():
        if libc.unshare(CLONE_NEWNET) != 0:
            result["error"] = OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            return
        try:
            quiet_ipv6()
            result["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def quiet_ipv6() -> None:
    """No IPv6 (router solicitations, DAD) on interfaces made in this namespace."""
    try:
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # no IPv6 in this kernel: nothing to quiet


def netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a TAP"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def open_tap_and_wire(name="embertest0"):
    tap = Tap.open(name)
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    wire.bind((name, 0))
    wire.settimeout(2)
    return tap, wire


def recv_test_frame(wire):
    """The next frame of our test ethertype (the kernel may emit IPv6 chatter too)."""
    while True:
        data = wire.recv(70000)
        if struct.unpack_from(">H", data, 12)[0] == ETHERTYPE_TEST:
            return data


@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
def test_real_tap_both_directions():
    tap, wire = in_new_netns(open_tap_and_wire)
    r = Rig(tap=tap)
    try:
        assert tap.created
        payload = frame(b"guest to host" * 20, src=b"\x52\x54\x00\x12\x34\x56")
        r.send(payload)
        assert recv_test_frame(wire) == payload
        bufs = r.post_rx(*[2048] * 8)
        r.driver.kick(net.RX_QUEUE)
        back = frame(b"host to guest" * 20, dst=bytes.fromhex("525400123456"))
        wire.send(back)
        for _ in range(20):
            r.loop.pump(timeout=0.05)
            used = r.rx.take_used()
            got = [r.memory.read(b.gpa, w)[NET_HDR_SIZE:] for b, (_, w) in zip(bufs, used, strict=False)]
            if back in got:
                break
            bufs = bufs[len(used):]
        else:
            raise AssertionError("frame never reached the guest")
    finally:
        wire.close()
        r.close()


class Clock:
    def __init__(self):
        self.now = 50.0

    def __call__(self):
        return self.now


def test_tx_rate_limit_holds_frames_until_the_bucket_refills(rig):
    from ember.devices.ratelimit import RateLimiter, TokenBucket

    clock = Clock()
    rig.device.set_rate_limiter(net.TX_QUEUE, RateLimiter(ops=TokenBucket(2, 1000, clock=clock)), rig.loop)
    heads = [rig.send(frame(bytes([i]) * 60)) for i in range(3)]
    assert [rig.tap.peer.recv(2048)[-1] for _ in range(2)] == [0, 1]
    assert [h for h, _ in rig.tx.take_used()] == heads[:2]  # the third waits in the ring
    [(delay, _)] = rig.loop.later
    assert delay == pytest.approx(0.5)
    clock.now += delay
    rig.loop.fire_timers()
    assert rig.tap.peer.recv(2048)[-1] == 2 and [h for h, _ in rig.tx.take_used()] == heads[2:]


def test_rx_rate_limit_keeps_the_frame_and_delivers_it_later(rig):
    from ember.devices.ratelimit import RateLimiter, TokenBucket

    clock = Clock()
    limit = RateLimiter(bandwidth=TokenBucket(150, 1000, clock=clock))  # 150 bytes/s of frames
    rig.device.set_rate_limiter(net.RX_QUEUE, limit, rig.loop)
    rig.post_rx(2048, 2048)
    rig.driver.kick(net.RX_QUEUE)
    for i in range(2):
        rig.tap.peer.send(bytes(NET_HDR_SIZE) + frame(bytes([i]) * 86))  # 100-byte frames
    rig.loop.pump()
    assert len(rig.rx.take_used()) == 1 and rig.device.rx_packets == 1  # the second is held
    assert not rig.loop.readers  # and the TAP is not read meanwhile
    clock.now += 1.0
    rig.loop.fire_timers()
    rig.loop.pump()
    ((_, written),) = rig.rx.take_used()
    assert written == NET_HDR_SIZE + 100 and rig.device.rx_packets == 2
    counts = rig.device.metrics()
    assert counts["rx_packets_count"] == 2 and counts["rx_bytes_count"] == 200
    assert counts["rx_rate_limiter_throttled"] >= 1 and counts["tx_rate_limiter_throttled"] == 0
