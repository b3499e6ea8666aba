"""One proxied vsock stream: a guest port paired with a host Unix socket (VIRTIO 1.2 5.10.6).

Holds the connection state and both directions of credit-based flow control
(5.10.6.3): what the guest may still send us (buf_alloc/fwd_cnt we advertise)
and what we may still send the guest (its buf_alloc/fwd_cnt, our tx_cnt).
"""

from __future__ import annotations

import enum
import logging
import socket

from ember.devices.virtio.vsock.packet import U32_MASK

log = logging.getLogger(__name__)

CONN_BUF_SIZE = 256 * 1024  # what we advertise as buf_alloc: guest data we hold unwritten
CREDIT_LOW_WATER = 64 * 1024  # refresh the guest's view of our free space below this


class State(enum.Enum):
    CONNECTING = "connecting"  # host asked for the guest port; REQUEST sent, no RESPONSE yet
    ESTABLISHED = "established"
    CLOSING = "closing"  # we sent SHUTDOWN after the host hung up; waiting for the guest's RST


class Connection:
    """Ports, the host socket, and the counters that bound each direction."""

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket, state: State) -> None:
        self.local_port = local_port  # the host-side (CID 2) port
        self.peer_port = peer_port  # the guest's port
        self.sock = sock
        self.state = state
        self.closed = False
        self.reading = False  # host socket registered with the event loop
        self.writing = False  # waiting for the host socket to drain `pending`
        # guest -> host
        self.buf_alloc = CONN_BUF_SIZE
        self.rx_cnt = 0  # payload bytes the guest sent us
        self.fwd_cnt = 0  # of those, bytes written to the host socket
        self.last_fwd_cnt_sent = 0  # fwd_cnt as the guest last heard it
        self.pending = bytearray()  # guest bytes the host socket has not taken yet
        self.shut_host_write = False  # guest said SHUTDOWN_SEND: half-close once pending drains
        # host -> guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes we sent the guest
        self.credit_requested = False
        self.guest_shut_rcv = False

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    # -- host -> guest credit -----------------------------------------------------------
    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        """Every guest packet carries its current receive buffer and forward count."""
        self.peer_buf_alloc, self.peer_fwd_cnt = buf_alloc, fwd_cnt
        if self.peer_credit():
            self.credit_requested = False

    def peer_credit(self) -> int:
        """Bytes the guest can still take; a forward count ahead of what we sent gives 0."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(self.peer_buf_alloc - in_flight, 0)

    def sent(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32_MASK

    # -- guest -> host --------------------------------------------------------------------
    def free_space(self) -> int:
        return self.buf_alloc - ((self.rx_cnt - self.fwd_cnt) & U32_MASK)

    def credit_update_due(self) -> bool:
        """The guest thinks we are nearly full though we have drained since we last said."""
        seen_free = self.buf_alloc - ((self.rx_cnt - self.last_fwd_cnt_sent) & U32_MASK)
        return seen_free < CREDIT_LOW_WATER and self.fwd_cnt != self.last_fwd_cnt_sent

    def forward(self, views: list[memoryview]) -> None:
        """Guest payload to the host socket: written now if it fits, else held in `pending`.
        Raises OSError when the host side is gone."""
        n = sum(map(len, views))
        self.rx_cnt = (self.rx_cnt + n) & U32_MASK
        if self.pending:
            self.pending += b"".join(views)
            return
        written = self._send(views)
        self._forwarded(written)
        if written < n:
            self.pending += b"".join(views)[written:]

    def flush(self) -> None:
        """Write what the host socket refused before; raises OSError when it is gone."""
        if not self.pending:
            return
        written = self._send([memoryview(self.pending)])
        del self.pending[:written]
        self._forwarded(written)

    def _send(self, views: list[memoryview]) -> int:
        try:
            return self.sock.sendmsg(views)
        except BlockingIOError:
            return 0

    def _forwarded(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & U32_MASK

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
