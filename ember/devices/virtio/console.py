"""virtio-console with a single port and no multiport (VIRTIO 1.2 section 5.3).

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the
guest's output to the host. Host input waits in a bounded buffer until the
driver posts receive buffers; the guest sees /dev/hvc0.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

from ember.devices.virtio.device import VIRTIO_ID_CONSOLE, VirtioDevice
from ember.devices.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

RECEIVEQ = 0
TRANSMITQ = 1
DEFAULT_QUEUE_SIZE = 256
MAX_PENDING_INPUT = 1 << 20  # host input held while the guest posts no buffers
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr (5.3.4)


class ConsoleDevice(VirtioDevice):
    """One console port: guest output goes to `output`, host input via enqueue_input()."""

    device_id = VIRTIO_ID_CONSOLE

    def __init__(self, output: Callable[[bytes], None], *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__([queue_size, queue_size], 0)
        self.output = output
        self._pending = bytearray()
        self._pending_lock = threading.Lock()
        self.bytes_in = self.bytes_out = self.bytes_dropped = 0

    def config_bytes(self) -> bytes:
        return CONFIG.pack(0, 0, 1, 0)

    def enqueue_input(self, data: bytes) -> None:
        """Host input for the guest (any thread); delivered as receive buffers allow."""
        with self._pending_lock:
            room = MAX_PENDING_INPUT - len(self._pending)
            if len(data) > room:
                self.bytes_dropped += len(data) - room
                log.warning("virtio-console: guest not reading; dropped %d bytes", len(data) - room)
            self._pending += data[:max(room, 0)]
        self.kick(RECEIVEQ)

    def process_queue(self, index: int) -> None:
        if index == RECEIVEQ:
            self._receive()
        elif index == TRANSMITQ:
            self._transmit()

    def _receive(self) -> None:
        queue, pushed = self.queues[RECEIVEQ], False
        while True:
            with self._pending_lock:
                if not self._pending:
                    break
                chain = queue.pop()
                if chain is None:
                    break
                written = self._copy_out(chain.writable)
            queue.push_used(chain.head, written)
            pushed = True
        if pushed:
            self.signal_used(RECEIVEQ)

    def _copy_out(self, views: list[memoryview]) -> int:
        """Move pending input into the views; the caller holds the pending lock."""
        done = 0
        for view in views:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            del self._pending[:n]
            done += n
        self.bytes_in += done
        return done

    def _transmit(self) -> None:
        self.consume_chains(TRANSMITQ, self._send)

    def _send(self, chain: DescriptorChain) -> None:
        data = b"".join(chain.readable)
        if data:
            self.bytes_out += len(data)
            self.output(data)
