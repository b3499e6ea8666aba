"""The virtio-mmio transport, version 2 only (VIRTIO 1.2 section 4.2).

Decodes the register window (4.2.2), runs device status and feature
negotiation (2.1, 2.2, 3.1), sets up queues and raises interrupts. A guest
that breaks the protocol gets DEVICE_NEEDS_RESET (2.1.2), never an exception.

With a RegisterMirror (mirror.py) the guest reads registers from memory, with
no exit; every change is published there before the guest can look. KVM may
queue InterruptACK writes in its coalesced ring (Ember replays them late), so
raising an interrupt first replays the queued ACKs: a late ACK then never
hides an interrupt raised after it. At worst the driver sees one interrupt
with nothing new to do.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import msgspec

from ember.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceState,
    VirtioDevice,
)
from ember.devices.virtio.mirror import RegisterMirror
from ember.devices.virtio.queue import QueueState, Virtqueue, VirtqueueError
from ember.memory import GuestMemoryError

log = logging.getLogger(__name__)

MMIO_WINDOW_SIZE = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"EMBR", "little")

# Register offsets (4.2.2).
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100
REG_SIZE = 4
ACCESS_SIZES = (1, 2, 4, 8)
NO_SHM_REGION = 0xFFFFFFFF  # SHMLen/SHMBase read as all ones: no shared memory

# Device status bits (2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
DRIVER_STATUS_BITS = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2
U32_MASK = 0xFFFFFFFF
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX

# Queue address registers: offset -> (QueueState field, shift of this half).
_QUEUE_ADDRESS_REGS = {
    REG_QUEUE_DESC_LOW: ("desc_addr", 0), REG_QUEUE_DESC_HIGH: ("desc_addr", 32),
    REG_QUEUE_DRIVER_LOW: ("driver_addr", 0), REG_QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    REG_QUEUE_DEVICE_LOW: ("device_addr", 0), REG_QUEUE_DEVICE_HIGH: ("device_addr", 32),
}
_SHM_REGS = (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH)
# What the selected queue shows; the registers a guest can read that change.
_QUEUE_READABLE = (REG_QUEUE_NUM_MAX, REG_QUEUE_READY, *_QUEUE_ADDRESS_REGS)
_VOLATILE = (REG_DEVICE_FEATURES, *_QUEUE_READABLE, REG_STATUS, REG_CONFIG_GENERATION)  # InterruptStatus apart
# Registers whose value a write to the key register can change (for the mirror).
_SHOWN_AFTER_WRITE = {
    REG_DEVICE_FEATURES_SEL: (REG_DEVICE_FEATURES,),
    REG_QUEUE_SEL: _QUEUE_READABLE,
    REG_QUEUE_READY: (REG_QUEUE_READY,),
    REG_STATUS: (REG_STATUS,),
    **{offset: (offset,) for offset in _QUEUE_ADDRESS_REGS},
}


def cmdline_param(base: int, size: int, irq: int) -> str:
    """The Linux kernel parameter that declares one virtio-mmio device."""
    length = f"{size // 1024}K" if size % 1024 == 0 else str(size)
    return f"virtio_mmio.device={length}@{base:#x}:{irq}"


class TransportState(msgspec.Struct):
    """Everything the transport holds, for snapshots."""

    status: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0
    queue_sel: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    queues: list[QueueState] = []
    device: DeviceState | None = None


class VirtioMmioTransport:
    """One virtio-mmio register window in front of one VirtioDevice."""

    def __init__(self, device: VirtioDevice, memory, irq, mirror: RegisterMirror | None = None) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.mirror = mirror
        self.queues = [Virtqueue(memory, size) for size in device.queue_max_sizes]
        self.state = TransportState(queues=[q.state for q in self.queues])
        self._lock = threading.RLock()
        # InterruptStatus alone: taken by ACKs replayed under the coalesced ring's lock,
        # which must never wait for the transport lock (its holder may be replaying).
        self._irq_lock = threading.Lock()
        self.catch_up: Callable[[], object] = lambda: None  # replays ACKs KVM has queued
        self._constants = {
            REG_MAGIC: MAGIC_VALUE, REG_VERSION: VERSION, REG_DEVICE_ID: device.device_id,
            REG_VENDOR_ID: VENDOR_ID, **dict.fromkeys(_SHM_REGS, NO_SHM_REGION),
        }
        device.bind(self._signal_used, self.notify)
        self._publish_all()

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    @property
    def device_features(self) -> int:
        return self.device.features | TRANSPORT_FEATURES

    @property
    def status(self) -> int:
        return self.state.status

    @property
    def broken(self) -> bool:
        return bool(self.state.status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED))

    # -- MMIO bus entry points ---------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """A guest load from the window; bad accesses read as zeros."""
        with self._lock:
            if size not in ACCESS_SIZES or offset < 0:
                return bytes(max(size, 0))
            if offset >= REG_CONFIG:
                return self.device.read_config(offset - REG_CONFIG, size)
            if size != REG_SIZE or offset % REG_SIZE:
                return bytes(size)
            return (self._read_register(offset) & U32_MASK).to_bytes(REG_SIZE, "little")

    def write(self, offset: int, data: bytes) -> None:
        """A guest store to the window; bad accesses are ignored."""
        if offset == REG_INTERRUPT_ACK and len(data) == REG_SIZE:
            self._acknowledge(int.from_bytes(data, "little"))
            return
        with self._lock:
            if offset >= REG_CONFIG:
                self.device.write_config(offset - REG_CONFIG, bytes(data))
                self._publish_config()
            elif len(data) == REG_SIZE and offset % REG_SIZE == 0 and offset >= 0:
                self._write_register(offset, int.from_bytes(data, "little"))
                self._publish(_SHOWN_AFTER_WRITE.get(offset, ()))
            else:
                log.debug("virtio-mmio: ignored %d-byte write at %#x", len(data), offset)

    # -- registers ----------------------------------------------------------------
    def _selected_queue(self) -> Virtqueue | None:
        sel = self.state.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        """A register's value; reading has no side effect (the mirror shows the same)."""
        s = self.state
        if offset == REG_INTERRUPT_STATUS:
            return s.interrupt_status
        if offset == REG_STATUS:
            return s.status
        if offset == REG_CONFIG_GENERATION:
            return s.config_generation
        if offset == REG_DEVICE_FEATURES:
            return self.device_features >> (32 * s.device_features_sel) if s.device_features_sel < 2 else 0
        if offset in _QUEUE_READABLE:
            queue = self._selected_queue()
            if queue is None:
                return 0
            if offset == REG_QUEUE_NUM_MAX:
                return queue.state.max_size
            if offset == REG_QUEUE_READY:
                return int(queue.state.ready)
            name, shift = _QUEUE_ADDRESS_REGS[offset]
            return getattr(queue.state, name) >> shift
        return self._constants.get(offset, 0)

    def _write_register(self, offset: int, value: int) -> None:
        s = self.state
        if offset == REG_DEVICE_FEATURES_SEL:
            s.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            s.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == REG_QUEUE_SEL:
            s.queue_sel = value
        elif offset == REG_QUEUE_NOTIFY:
            self.notify(value)
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset in (REG_QUEUE_NUM, REG_QUEUE_READY) or offset in _QUEUE_ADDRESS_REGS:
            self._write_queue_register(offset, value)
        else:
            log.debug("virtio-mmio: ignored write %#x to register %#x", value, offset)

    def _write_driver_features(self, value: int) -> None:
        s = self.state
        if s.status & STATUS_FEATURES_OK or s.driver_features_sel >= 2:
            return
        shift = 32 * s.driver_features_sel
        s.driver_features = (s.driver_features & ~(U32_MASK << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            return
        q = queue.state
        if offset == REG_QUEUE_READY:
            self._write_queue_ready(queue, bool(value & 1))
        elif q.ready:
            return  # a live queue's layout cannot change under it
        elif offset == REG_QUEUE_NUM:
            q.size = value
        else:
            name, shift = _QUEUE_ADDRESS_REGS[offset]
            setattr(q, name, (getattr(q, name) & ~(U32_MASK << shift)) | (value << shift))

    def _write_queue_ready(self, queue: Virtqueue, ready: bool) -> None:
        """QueueReady: set up before DRIVER_OK (3.1.1) or toggled later, as Linux's del_vq does."""
        if ready == queue.state.ready:
            return
        queue.state.ready = ready
        if not ready:
            queue.deactivate()
        elif self.state.status & STATUS_DRIVER_OK and not self.broken:
            try:
                self._activate_queue(queue)
            except VirtqueueError as exc:
                self._fail(exc)

    def _activate_queue(self, queue: Virtqueue) -> None:
        features = self.state.driver_features
        queue.activate(event_idx=bool(features & VIRTIO_F_EVENT_IDX),
                       indirect=bool(features & VIRTIO_F_INDIRECT_DESC))

    # -- status machine (2.1, 3.1) -------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.state.status
        new = (value & DRIVER_STATUS_BITS) | (old & STATUS_DEVICE_NEEDS_RESET)
        if new & old & DRIVER_STATUS_BITS != old & DRIVER_STATUS_BITS:
            log.warning("virtio-mmio: driver cleared status bits (%#x -> %#x); ignored", old, value)
            return
        added = new & ~old
        if added & STATUS_FEATURES_OK and not self._features_acceptable():
            new &= ~STATUS_FEATURES_OK
        if added & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            new &= ~STATUS_DRIVER_OK
        self.state.status = new
        if new & ~old & STATUS_DRIVER_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        s = self.state
        if not s.status & STATUS_DRIVER:
            return False
        unknown = s.driver_features & ~self.device_features
        if unknown or not s.driver_features & VIRTIO_F_VERSION_1:
            log.warning("virtio-mmio: refusing driver features %#x (offered %#x)",
                        s.driver_features, self.device_features)
            return False
        return True

    def _activate(self) -> None:
        try:
            for queue in self.queues:
                if queue.state.ready:
                    self._activate_queue(queue)
            self.device.activate(list(self.queues), self.state.driver_features)
        except (VirtqueueError, GuestMemoryError) as exc:
            self._fail(exc)

    def reset(self) -> None:
        """Device reset (2.4): back to the state after power-on."""
        with self._lock:
            self.device.reset()
            for queue in self.queues:
                queue.reset()
            generation = self.state.config_generation
            with self._irq_lock:
                self.state = TransportState(queues=[q.state for q in self.queues], config_generation=generation)
            self._publish_all()

    def close(self) -> None:
        """Tear down: drop every view into guest memory and close the device's backend."""
        with self._lock:
            self.reset()
            self.device.close()

    # -- queues and interrupts -------------------------------------------------------
    def notify(self, index: int) -> None:
        """The driver kicked queue `index` (ioeventfd or a QueueNotify exit)."""
        with self._lock:
            if not self.state.status & STATUS_DRIVER_OK or self.broken:
                return
            if index >= len(self.queues) or not self.queues[index].active:
                return
            try:
                self.device.process_queue(index)
            except (VirtqueueError, GuestMemoryError) as exc:
                self._fail(exc)
            except Exception as exc:  # a device bug must not kill the event loop
                log.exception("virtio-mmio: device %d crashed on queue %d", self.device.device_id, index)
                self._fail(exc)

    def _signal_used(self, index: int) -> None:
        with self._lock:
            if 0 <= index < len(self.queues) and self.queues[index].needs_notification():
                self._interrupt(INT_USED_BUFFER)

    def change_device(self, change: Callable[[], object]) -> None:
        """Run ``change`` on the device between two requests (no queue is being served
        meanwhile), then tell the driver its config space changed."""
        with self._lock:
            change()
            self.config_changed()

    def config_changed(self) -> None:
        """The device's config space changed: bump the generation and tell the driver.

        With a mirror the generation moves before and after the new bytes land, so
        a driver's generation check (2.5.1) catches a read that overlapped the copy.
        """
        with self._lock:
            self._bump_generation()
            if self.mirror is not None:
                self._publish_config()
                self._bump_generation()
            if self.state.status & STATUS_DRIVER_OK:
                self._interrupt(INT_CONFIG_CHANGE)

    def _bump_generation(self) -> None:
        self.state.config_generation = (self.state.config_generation + 1) & U32_MASK
        self._publish((REG_CONFIG_GENERATION,))

    def _interrupt(self, reason: int) -> None:
        """Set ``reason`` in InterruptStatus and raise the line, after the ACKs already queued."""
        self.catch_up()
        with self._irq_lock:
            self.state.interrupt_status |= reason
            self._publish_interrupt_status()
        self.irq.trigger()

    def _acknowledge(self, value: int) -> None:
        """InterruptACK: the driver has handled these InterruptStatus bits."""
        with self._irq_lock:
            self.state.interrupt_status &= ~value
            self._publish_interrupt_status()

    def _fail(self, exc: Exception) -> None:
        if self.state.status & STATUS_DEVICE_NEEDS_RESET:
            return
        log.error("virtio-mmio: device %d needs reset: %s", self.device.device_id, exc)
        self.state.status |= STATUS_DEVICE_NEEDS_RESET
        self._publish((REG_STATUS,))
        self._interrupt(INT_CONFIG_CHANGE)

    # -- the guest-readable mirror -----------------------------------------------------
    def _publish(self, offsets) -> None:
        mirror = self.mirror
        if mirror is not None:
            for offset in offsets:
                mirror.set_word(offset, self._read_register(offset))

    def _publish_interrupt_status(self) -> None:
        """Under _irq_lock, with every change of InterruptStatus."""
        if self.mirror is not None:
            self.mirror.set_word(REG_INTERRUPT_STATUS, self.state.interrupt_status)

    def _publish_config(self) -> None:
        if self.mirror is not None:
            self.mirror.set_bytes(REG_CONFIG, self.device.config_bytes())

    def _publish_all(self) -> None:
        self._publish((*self._constants, *_VOLATILE))
        self._publish_config()
        with self._irq_lock:  # InterruptStatus changes under this lock alone
            self._publish_interrupt_status()

    def describe(self) -> str:
        """Status, interrupt state and every queue's indices (for stackdump's report)."""
        s = self.state
        mirror = self.mirror
        shown = "" if mirror is None or mirror.closed else f" (guest sees {mirror.word(REG_INTERRUPT_STATUS):#x})"
        raised = getattr(self.irq, "count", "?")
        lines = [f"status {s.status:#x}, InterruptStatus {s.interrupt_status:#x}{shown}, interrupts raised {raised}"]
        lines += [f"  queue {index}: {queue.describe()}" for index, queue in enumerate(self.queues)]
        return "\n".join(lines)

    # -- snapshots -------------------------------------------------------------------
    def save_state(self) -> TransportState:
        with self._lock:
            return msgspec.structs.replace(self.state, device=self.device.save_state(),
                                           queues=[msgspec.structs.replace(q.state) for q in self.queues])

    def restore_state(self, state: TransportState) -> None:
        """Load saved registers and queues; re-map the rings if the driver was live."""
        with self._lock:
            self.reset()
            with self._irq_lock:
                self.state = msgspec.structs.replace(state, queues=[])
            for queue, saved in zip(self.queues, state.queues):
                queue.state = msgspec.structs.replace(saved)
            self.state.queues = [q.state for q in self.queues]
            if state.device is not None:
                self.device.restore_state(state.device)
            if self.state.status & STATUS_DRIVER_OK and not self.broken:
                self._activate()
            self._publish_all()
