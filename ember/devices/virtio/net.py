"""virtio-net on a TAP backend (VIRTIO 1.2 section 5.1).

Queue 0 receives frames from the TAP into guest buffers (mergeable receive
buffers, 5.1.6.3.1, let one frame span several chains); queue 1 sends the
guest's frames to the TAP. Both carry a 12-byte virtio_net_hdr_v1 (5.1.6),
which is also what the TAP speaks with IFF_VNET_HDR, so headers pass through.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

from ember.devices.backends.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, Tap
from ember.devices.virtio.buffers import scatter
from ember.devices.virtio.device import VIRTIO_ID_NET, VirtioDevice
from ember.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from ember.errors import ConfigError

log = logging.getLogger(__name__)

RX_QUEUE = 0
TX_QUEUE = 1
DEFAULT_QUEUE_SIZE = 256

# Feature bits (5.1.3).
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
BASE_FEATURES = VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS
OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4
                    | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_HOST_TSO4
                    | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN)
# Guest receive offloads -> what the TAP may hand us (TUNSETOFFLOAD).
GUEST_OFFLOAD_TO_TUN = ((VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM), (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                        (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6), (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN))

VIRTIO_NET_S_LINK_UP = 1
CONFIG = struct.Struct("<6sHH")  # mac, status, max_virtqueue_pairs (5.1.4)
MAC_LEN = 6

NET_HDR_SIZE = 12  # struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_*, num_buffers
NUM_BUFFERS = struct.Struct("<H")
NUM_BUFFERS_OFFSET = 10
MAX_FRAME = 65562  # vnet header + the largest frame a TAP hands over (64 KiB GSO + Ethernet/VLAN)
TX_BUDGET = 256  # chains sent per notify before yielding to the event loop
RX_BUDGET = 256  # frames received per wake-up
IDX_MASK = 0xFFFF


def parse_mac(mac: str | bytes | None) -> bytes:
    """A MAC from 'aa:bb:cc:dd:ee:ff' or 6 bytes; None gives a random local unicast one."""
    if mac is None:
        raw = bytearray(os.urandom(MAC_LEN))
        raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
        return bytes(raw)
    if isinstance(mac, bytes):
        if len(mac) != MAC_LEN:
            raise ConfigError(f"a MAC address has {MAC_LEN} bytes, not {len(mac)}")
        return mac
    parts = mac.split(":")
    try:
        raw = bytes(int(p, 16) for p in parts if len(p) in (1, 2))
    except ValueError:
        raw = b""
    if len(raw) != MAC_LEN or len(parts) != MAC_LEN:
        raise ConfigError(f"bad MAC address {mac!r} (want aa:bb:cc:dd:ee:ff)")
    return raw


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetDevice(VirtioDevice):
    """A network card whose wire is a TAP interface on the host."""

    device_id = VIRTIO_ID_NET

    def __init__(self, loop, tap: Tap, *, mac: str | bytes | None = None, offloads: bool = True,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__([queue_size, queue_size], BASE_FEATURES | (OFFLOAD_FEATURES if offloads else 0))
        self.loop = loop
        self.tap = tap
        self.mac = parse_mac(mac)
        self._rx_buffer = bytearray(MAX_FRAME)
        self._rx_pending = 0  # length of a frame read from the TAP, waiting for rx buffers
        self._rx_admitted = False  # whether the rx rate limiter let that frame through
        self._watching = False
        self._watch_lock = threading.Lock()
        self.rx_packets = self.rx_bytes = self.rx_dropped = 0
        self.tx_packets = self.tx_bytes = self.tx_dropped = 0

    @classmethod
    def open(cls, loop, tap_name: str, *, mac: str | bytes | None = None, **kwargs) -> NetDevice:
        """A device on TAP `tap_name` (created and brought up if missing)."""
        return cls(loop, Tap.open(tap_name), mac=mac, **kwargs)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    @property
    def mergeable(self) -> bool:
        return bool(self.acked_features & VIRTIO_NET_F_MRG_RXBUF)

    def metrics(self) -> dict[str, int]:
        """Frames and their bytes (without the virtio-net header) each way; dropped frames:
        received with no room in a non-mergeable buffer, or sent too long or refused by the TAP."""
        return {"rx_packets_count": self.rx_packets, "rx_bytes_count": self.rx_bytes, "rx_dropped": self.rx_dropped,
                "tx_packets_count": self.tx_packets, "tx_bytes_count": self.tx_bytes, "tx_dropped": self.tx_dropped,
                "rx_rate_limiter_throttled": self.throttled_events.get(RX_QUEUE, 0),
                "tx_rate_limiter_throttled": self.throttled_events.get(TX_QUEUE, 0)}

    # -- lifecycle ----------------------------------------------------------------
    def activate(self, queues: list[Virtqueue], acked_features: int) -> None:
        super().activate(queues, acked_features)
        self._set_tap_offload(acked_features)
        self._watch_tap(True)

    def _set_tap_offload(self, acked: int) -> None:
        flags = 0
        for feature, tun_flag in GUEST_OFFLOAD_TO_TUN:
            if acked & feature:
                flags |= tun_flag
        try:
            self.tap.set_offload(flags)
        except OSError as exc:
            log.error("virtio-net: TUNSETOFFLOAD %#x on %s failed: %s", flags, self.tap.name, exc.strerror)

    def reset(self) -> None:
        self._watch_tap(False)
        self._rx_pending, self._rx_admitted = 0, False
        super().reset()

    def close(self) -> None:
        self._watch_tap(False)
        self.tap.close()

    # -- TAP readiness --------------------------------------------------------------
    def _watch_tap(self, on: bool) -> None:
        """Watch the TAP only while rx buffers wait, so a full guest never spins the loop."""
        with self._watch_lock:
            if on == self._watching or self.tap.fd < 0:
                return
            self._watching = on
            if on:
                self.loop.add_reader(self.tap.fd, self._tap_readable)
            else:
                self.loop.remove_reader(self.tap.fd)

    def _tap_readable(self) -> None:
        """One-shot: stop watching, then receive; _receive re-arms while it can take frames."""
        self._watch_tap(False)
        self.kick(RX_QUEUE)

    def process_queue(self, index: int) -> None:
        if index == RX_QUEUE:
            self._receive()
        elif index == TX_QUEUE:
            self._transmit()

    # -- transmit (5.1.6.2) -------------------------------------------------------------
    def _transmit(self) -> None:
        self.consume_chains(TX_QUEUE, self._send, budget=TX_BUDGET, loop=self.loop)

    def _send(self, chain: DescriptorChain) -> None:
        length = chain.readable_len
        if length < NET_HDR_SIZE:
            raise VirtqueueError(f"virtio-net tx chain of {length} bytes, shorter than its header")
        if length > MAX_FRAME:
            self.tx_dropped += 1
            log.debug("virtio-net: dropped a %d-byte tx frame", length)
            return
        try:
            self.tap.writev(chain.readable)
        except OSError as exc:
            self.tx_dropped += 1
            log.debug("virtio-net: TAP write failed: %s", exc.strerror)
            return
        self.tx_packets += 1
        self.tx_bytes += length - NET_HDR_SIZE

    # -- receive (5.1.6.3, 5.1.6.4) -----------------------------------------------------
    def _receive(self) -> None:
        queue, delivered = self.queues[RX_QUEUE], 0
        try:
            while delivered < RX_BUDGET:
                if not self._rx_pending and not self._read_frame(queue):
                    return
                if not self._rx_admitted:
                    if self.limiters and self.throttle(RX_QUEUE, self._rx_pending - NET_HDR_SIZE):
                        self._watch_tap(False)  # the frame waits; the limiter's retry brings us back
                        return
                    self._rx_admitted = True
                if not self._deliver(queue):
                    self._watch_tap(False)  # the guest's rx notify brings us back
                    return
                delivered += 1
            self._watch_tap(True)  # budget spent; level-triggered epoll calls again
        finally:
            if delivered:
                self.signal_used(RX_QUEUE)

    def _read_frame(self, queue: Virtqueue) -> bool:
        """Read one frame if the guest has a buffer for it; arms or disarms the TAP watch."""
        if not self._rx_buffer_available(queue):
            self._watch_tap(False)
            return False
        try:
            length = self.tap.read_into(memoryview(self._rx_buffer))
        except OSError as exc:
            log.warning("virtio-net: TAP read failed: %s", exc.strerror)
            length = None
        if length is None or length == 0:
            self._watch_tap(True)
            return False
        if length < NET_HDR_SIZE:  # not a frame the TAP should produce; drop and wait for the next
            self.rx_dropped += 1
            self._watch_tap(True)
            return False
        self._rx_pending = length
        return True

    @staticmethod
    def _rx_buffer_available(queue: Virtqueue) -> bool:
        """Peek: is a receive chain posted? (A pop that is undone; it also arms EVENT_IDX.)"""
        if queue.pop() is None:
            return False
        queue.undo_pop(1)
        return True

    def _deliver(self, queue: Virtqueue) -> bool:
        """Place the pending frame in rx chains; False (nothing consumed) if too few are posted."""
        chains = self._take_chains(queue)
        if chains is None:
            return False
        frame = memoryview(self._rx_buffer)[:self._rx_pending]
        self._rx_pending, self._rx_admitted = 0, False
        if not chains:  # did not fit a non-mergeable buffer: dropped, its chain reused
            self.rx_dropped += 1
            return True
        NUM_BUFFERS.pack_into(self._rx_buffer, NUM_BUFFERS_OFFSET, len(chains))
        offset, used = 0, []
        for chain in chains:
            written = scatter(chain.writable, frame[offset:])
            used.append((chain.head, written))
            offset += written
        queue.push_used_many(used)  # all of the frame's buffers at once (5.1.6.4.2)
        self.rx_packets += 1
        self.rx_bytes += len(frame) - NET_HDR_SIZE
        return True

    def _take_chains(self, queue: Virtqueue) -> list[DescriptorChain] | None:
        """Pop enough chains for the frame: [] means drop it, None means wait for more."""
        need, chains, room = self._rx_pending, [], 0
        while room < need:
            chain = queue.pop()
            if chain is None:
                queue.undo_pop(len(chains))
                return None
            if chain.writable_len < NET_HDR_SIZE:
                raise VirtqueueError(f"virtio-net rx chain of {chain.writable_len} writable bytes")
            chains.append(chain)
            room += chain.writable_len
            if not self.mergeable:
                break
        if room < need:
            queue.undo_pop(1)
            return []
        return chains
