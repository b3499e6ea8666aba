"""A microVM: guest memory, vCPUs and devices built from a VmConfig, and its lifecycle.

``MicroVM`` is Ember's Python API; the CLI and the Firecracker-compatible
HTTP server both drive it. It creates the VM with the in-kernel irqchip and
PIT (KVM API), loads the kernel per the Linux boot protocol, wires the
device model to the PIO and MMIO buses, then runs one thread per vCPU and
one event-loop thread for device work.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

from ember import config as cfg
from ember import stackdump
from ember.arch.x86_64 import boot as x86_boot
from ember.arch.x86_64 import layout
from ember.console import ConsoleInput, ConsoleOutput, open_output
from ember.devices import ratelimit
from ember.devices.bus import Bus
from ember.devices.legacy.boot_timer import BootTimer
from ember.devices.legacy.i8042 import I8042
from ember.devices.legacy.serial import Serial
from ember.devices.virtio.mirror import RegisterMirror
from ember.devices.virtio.mmio import REG_INTERRUPT_ACK, REG_QUEUE_NOTIFY, REG_SIZE, VirtioMmioTransport, cmdline_param
from ember.errors import EmberError
from ember.eventloop import EventLoop
from ember.exitstats import ExitStats
from ember.interrupts import IrqfdLine
from ember.kvm import Kvm
from ember.kvm.coalesced import CoalescedMmioRing
from ember.kvm.structs import (KVM_CAP_COALESCED_MMIO, KVM_CAP_READONLY_MEM, KVM_CAP_TSC_DEADLINE_TIMER,
                               KVM_MEM_READONLY)
from ember.memory import GuestMemory
from ember.mmio_replay import CoalescedReplay
from ember.outcome import ExitInfo, ExitReason
from ember.vcpu_loop import VcpuLoop, describe_vcpu

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
COM1_PORT, COM1_IRQ = 0x3F8, 4
COM2_PORT, COM2_IRQ = 0x2F8, 3
SERIAL_PORTS = 8
I8042_PORT, I8042_PORTS = 0x60, 5
POST_PORT = 0x80  # Linux's io_delay port: a write-only sink
FIRST_VIRTIO_IRQ = 5
MIRROR_FIRST_SLOT = 256  # KVM memory slots of the register mirrors; guest RAM uses the first few
# Metric groups named after the device where Firecracker's name differs from Ember's.
_METRIC_GROUP = {"rng": "entropy"}


class QueueNotifier:
    """An ioeventfd on a queue's QueueNotify write, served on the event loop.

    ``catch_up`` runs first: it replays the guest's coalesced writes, which
    program order puts before this notify.
    """

    def __init__(self, vm, loop: EventLoop, transport, address: int, queue: int,
                 catch_up: Callable[[], None]) -> None:
        self._vm, self._loop, self._address, self._queue = vm, loop, address, queue
        self._transport, self._catch_up = transport, catch_up
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.register_ioeventfd(self.fd, address, 4, datamatch=queue)
        loop.add_reader(self.fd, self._fired)

    def _fired(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return
        self._catch_up()
        self._transport.notify(self._queue)

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        try:
            self._vm.unregister_ioeventfd(self.fd, self._address, 4, datamatch=self._queue)
        except Exception:
            pass
        os.close(self.fd)


class _Sink:
    """A device that accepts writes and reads as zero (Linux's port 0x80 delay)."""

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def _install_kick_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda *_: None)


_install_kick_handler()


def preflight(config: cfg.VmConfig) -> None:
    """Load kernel and initrd into throwaway guest memory: bad images fail here, without KVM.

    The CLI runs this before handing a boot to the rig, so a corrupt kernel or
    too little memory is a one-line error at once, not after the rig booted.
    """
    cfg.validate(config)
    mc = config.machine_config
    memory = GuestMemory(layout.ram_regions(mc.mem_size_mib << 20))
    try:
        boot = config.boot_source
        x86_boot.load_guest(memory, kernel_path=boot.kernel_image_path, initrd_path=boot.initrd_path,
                            cmdline=boot.boot_args or cfg.DEFAULT_BOOT_ARGS,
                            mem_size=mc.mem_size_mib << 20, vcpu_count=mc.vcpu_count)
    finally:
        memory.close()


class MicroVM:
    """One microVM. ``start()`` boots it; ``wait()`` returns how it ended."""

    def __init__(self, config: cfg.VmConfig, *, console: str = "stdio",
                 console_input: int | None = None, kvm_path: str = "/dev/kvm",
                 agent_socket: str | None = None, started_ns: int | None = None,
                 mirror_registers: bool = True) -> None:
        cfg.validate(config)
        self.config = config
        self.state = "Not started"
        self._console_spec = console
        self._console_input_fd = console_input
        self._kvm_path = kvm_path
        self._agent_socket = agent_socket
        self._mirror_registers = mirror_registers  # False: every register load exits (for tracing)
        self._started_ns = started_ns or time.monotonic_ns()
        self._lock = threading.Condition()
        self._exit: ExitInfo | None = None
        self._paused = False
        self._parked = 0
        self._guest_status: int | None = None
        self._threads: list[threading.Thread] = []
        self._loops: list[VcpuLoop] = []
        self._closers: list = []
        self.boot_time_ns: int | None = None  # process (or MicroVM) start to the guest's init
        self.guest_boot_ns: int | None = None  # first KVM_RUN to the guest's init
        self.run_started_ns: int | None = None
        self.exit_stats = ExitStats()
        self.virtio_devices: dict = {}
        self.coalesced: CoalescedReplay | None = None  # set up with the first vCPU

    # ---- building -------------------------------------------------------
    def start(self) -> None:
        if self.state != "Not started":
            raise EmberError("the microVM was already started")
        try:
            self._build()
        except BaseException:
            self._teardown()
            raise
        self.state = "Running"
        self.run_started_ns = time.monotonic_ns()
        stackdump.add_report(self.state_report)
        self.events.start()
        for index, loop in enumerate(self._loops):
            thread = threading.Thread(target=self._vcpu_main, args=(loop,), name=f"vcpu{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _build(self) -> None:
        mc = self.config.machine_config
        mem_size = mc.mem_size_mib << 20
        self.kvm = Kvm(self._kvm_path)
        self._closers.append(self.kvm)
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.memory = GuestMemory(layout.ram_regions(mem_size))
        self._closers.append(self.memory)
        self.memory.register(self.vm, track_dirty=mc.track_dirty_pages)
        self.events = EventLoop()
        self._closers.append(self.events)
        self.pio_bus, self.mmio_bus = Bus(), Bus()
        self._build_legacy_devices()
        self._build_virtio_devices()
        cmdline = self._cmdline()
        boot = self.config.boot_source
        self.boot = x86_boot.load_guest(
            self.memory, kernel_path=boot.kernel_image_path, initrd_path=boot.initrd_path,
            cmdline=cmdline, mem_size=mem_size, vcpu_count=mc.vcpu_count)
        supported = self.kvm.get_supported_cpuid()
        tsc_deadline = self.kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0  # the irqchip is in-kernel
        for index in range(mc.vcpu_count):
            vcpu = self.vm.create_vcpu(index)
            self._closers.append(vcpu)
            x86_boot.configure_vcpu(vcpu, self.boot, index, mc.vcpu_count, supported, tsc_deadline=tsc_deadline)
            if index == 0:  # the ring is the VM's; any vCPU's mapping reaches it
                self.coalesced = self._coalesce_interrupt_acks(vcpu)
            self._loops.append(VcpuLoop(vcpu, self.pio_bus, self.mmio_bus, ExitStats(), self.coalesced))
        log.info("built microVM: %d vCPU(s), %d MiB, cmdline %r", mc.vcpu_count, mc.mem_size_mib, cmdline)

    def _irq(self, gsi: int) -> IrqfdLine:
        line = IrqfdLine(self.vm, gsi)
        self._closers.append(line)
        return line

    def _build_legacy_devices(self) -> None:
        self.console_out: ConsoleOutput = open_output(self._console_spec)
        self._closers.append(self.console_out)
        self.serial = Serial(self._irq(COM1_IRQ), self.console_out)
        self.pio_bus.register(COM1_PORT, SERIAL_PORTS, self.serial, name="serial0")
        self.agent_serial = Serial(self._irq(COM2_IRQ), self._agent_output)
        self.pio_bus.register(COM2_PORT, SERIAL_PORTS, self.agent_serial, name="serial1")
        self.i8042 = I8042(on_reset=self._on_guest_reset)
        self.pio_bus.register(I8042_PORT, I8042_PORTS, self.i8042, name="i8042")
        self.pio_bus.register(POST_PORT, 1, _Sink(), name="post")
        self.boot_timer = BootTimer(on_boot_complete=self._on_boot_complete,
                                    on_exit_status=self._on_exit_status)
        self.mmio_bus.register(layout.BOOT_TIMER_ADDR, layout.BOOT_TIMER_SIZE, self.boot_timer, name="boot-timer")
        if self._console_input_fd is not None:
            stopped = ExitInfo(ExitReason.STOPPED, detail="console escape")
            self._console_in = ConsoleInput(self._console_input_fd, self.serial.enqueue_input,
                                            on_quit=lambda: self._end(stopped))
            self._closers.append(self._console_in)
            self.events.add_reader(self._console_in.fd, self._read_console)
        self._agent_clients: list = []
        if self._agent_socket:
            from ember.agent import AgentBridge
            self.agent_bridge = AgentBridge(self._agent_socket, self.events, self.agent_serial.enqueue_input)
            self._closers.append(self.agent_bridge)

    def _build_virtio_devices(self) -> None:
        # Each device model is imported only when the VM has one: start-up time is
        # mostly imports, several seconds of them under an emulated CPU.
        self._virtio_params: list[str] = []
        self._virtio_windows: list[int] = []
        drives = sorted(self.config.drives, key=lambda d: not d.is_root_device)  # the root drive is vda
        if drives:
            from ember.devices.virtio.block import BlockDevice
        for drive in drives:
            device = BlockDevice(drive.path_on_host, read_only=drive.is_read_only, drive_id=drive.drive_id)
            self.add_virtio_device(device, f"block:{drive.drive_id}")
            self.set_rate_limiter(f"block:{drive.drive_id}", 0, drive.rate_limiter)
        if self.config.network_interfaces:
            from ember.devices.virtio.net import NetDevice
        for iface in self.config.network_interfaces:
            device = NetDevice.open(self.events, iface.host_dev_name, mac=iface.guest_mac)
            self.add_virtio_device(device, f"net:{iface.iface_id}")
            self.set_rate_limiter(f"net:{iface.iface_id}", 0, iface.rx_rate_limiter)
            self.set_rate_limiter(f"net:{iface.iface_id}", 1, iface.tx_rate_limiter)
        if self.config.vsock is not None:
            from ember.devices.virtio.vsock import VsockDevice

            vsock = self.config.vsock
            self.add_virtio_device(VsockDevice(self.events, vsock.guest_cid, vsock.uds_path), "vsock")
        if self.config.entropy is not None:
            from ember.devices.virtio.rng import RngDevice

            self.add_virtio_device(RngDevice(), "rng")
            self.set_rate_limiter("rng", 0, self.config.entropy.rate_limiter)

    def update_drive(self, drive_id: str, path: str) -> None:
        """Swap a running drive's image for ``path`` (the guest sees the new size through a
        config-change interrupt); a file that cannot be opened changes nothing."""
        transport = self.virtio_devices.get(f"block:{drive_id}")
        if transport is None:
            raise EmberError(f"no drive {drive_id!r}")
        transport.change_device(lambda: transport.device.change_media(path))
        for drive in self.config.drives:
            if drive.drive_id == drive_id:
                drive.path_on_host = path

    def set_rate_limiter(self, device: str, queue: int, spec: cfg.RateLimiter | None) -> None:
        """Limit one queue of a virtio device ('block:<id>', 'net:<id>' with rx 0 and tx 1,
        'rng') by a Firecracker RateLimiter; None or zero-sized buckets lift the limit."""
        transport = self.virtio_devices.get(device)
        if transport is None:
            raise EmberError(f"no device {device!r}")
        transport.device.set_rate_limiter(queue, ratelimit.from_config(spec), self.events)

    def add_virtio_device(self, device, name: str) -> VirtioMmioTransport:
        """Put a virtio device behind the next virtio-mmio window, IRQ and ioeventfds."""
        index = len(self._virtio_params)
        base, size = layout.virtio_mmio_window(index)
        gsi = FIRST_VIRTIO_IRQ + index
        if gsi > layout.IRQ_MAX:
            raise EmberError(f"too many virtio devices: at most {layout.IRQ_MAX - FIRST_VIRTIO_IRQ + 1}")
        transport = VirtioMmioTransport(device, self.memory, self._irq(gsi), self._mirror_window(index, base))
        transport.catch_up = self._replay_coalesced
        self._closers.append(transport)
        self.mmio_bus.register(base, size, transport, name=name)
        for queue in range(transport.num_queues):
            notifier = QueueNotifier(self.vm, self.events, transport, base + REG_QUEUE_NOTIFY, queue,
                                     self._replay_coalesced)
            self._closers.append(notifier)
        self._virtio_params.append(cmdline_param(base, size, gsi))
        self._virtio_windows.append(base)
        self.virtio_devices[name] = transport
        return transport

    def _mirror_window(self, index: int, base: int) -> RegisterMirror | None:
        """Map a page of register values over a device's window, read-only, so that the
        guest's register loads (InterruptStatus on every interrupt) need no exit.

        Stores to the window still exit, or reach an ioeventfd or the coalesced ring: KVM
        treats a store to read-only memory as MMIO. None where KVM lacks read-only memory.
        """
        if not self._mirror_registers or self.kvm.check_extension(KVM_CAP_READONLY_MEM) <= 0:
            return None
        mirror = RegisterMirror()
        self._closers.append(mirror)  # closed after the transport that publishes to it
        self.vm.set_user_memory_region(MIRROR_FIRST_SLOT + index, base, mirror.size, mirror.host_address,
                                       KVM_MEM_READONLY)
        return mirror

    def _coalesce_interrupt_acks(self, vcpu) -> CoalescedReplay | None:
        """Let the guest's InterruptACK writes (one per virtio interrupt) skip their exit.

        KVM queues them in the coalesced MMIO ring. The event loop replays them
        when the guest's next queue notify wakes it, and a vCPU before its next
        exit, whichever comes first (mmio_replay.py). The transport's
        interrupts replay the queued ACKs first, so a late ACK never hides a newer
        interrupt (mmio.py). None where KVM lacks the ring.
        """
        page = self.kvm.check_extension(KVM_CAP_COALESCED_MMIO)
        if page <= 0 or not self.virtio_devices:
            return None
        ring = CoalescedMmioRing(vcpu.fd, page)
        self._closers.append(ring)
        for window in self._virtio_windows:
            self.vm.register_coalesced_mmio(window + REG_INTERRUPT_ACK, REG_SIZE)
        return CoalescedReplay(ring, self.mmio_bus)

    def _replay_coalesced(self) -> None:
        if self.coalesced is not None:
            self.coalesced.replay_if_pending()

    def _agent_output(self, data: bytes) -> None:
        bridge = getattr(self, "agent_bridge", None)
        if bridge is not None:
            bridge.guest_output(data)

    def _read_console(self) -> None:
        if not self._console_in.on_readable():
            self.events.remove_reader(self._console_in.fd)

    def _cmdline(self) -> str:
        args = self.config.boot_source.boot_args
        args = cfg.DEFAULT_BOOT_ARGS if args is None else args
        return " ".join([args, *self._virtio_params])

    # ---- running --------------------------------------------------------
    def _vcpu_main(self, loop: VcpuLoop) -> None:
        try:
            self._vcpu_life(loop)
        except Exception as err:  # a vCPU thread must never die silently
            log.exception("vCPU thread failed")
            self._end(ExitInfo(ExitReason.ERROR, detail=f"vCPU thread failed: {err}"))
        with self._lock:
            self.exit_stats.merge(loop.stats)

    def _vcpu_life(self, loop: VcpuLoop) -> None:
        while True:
            outcome = loop.run(lambda: self._exit is not None or self._paused)
            if outcome is not None:
                self._end(outcome)
            with self._lock:
                if self._exit is not None:
                    break
                if self._paused:
                    self._parked += 1
                    self._lock.notify_all()
                    while self._paused and self._exit is None:
                        self._lock.wait()
                    self._parked -= 1
                    loop.vcpu.immediate_exit = 0
                if self._exit is not None:
                    break

    def _on_boot_complete(self, timestamp_ns: int) -> None:
        self.boot_time_ns = timestamp_ns - self._started_ns
        if self.run_started_ns is not None:
            self.guest_boot_ns = timestamp_ns - self.run_started_ns
        log.info("guest reached init in %.1f ms", self.boot_time_ns / 1e6)

    def _on_exit_status(self, status: int) -> None:
        self._guest_status = status

    def _on_guest_reset(self) -> None:
        if self.console_out.panicked:
            self._end(ExitInfo(ExitReason.PANIC, detail="kernel panic"))
        elif self._guest_status is not None:
            self._end(ExitInfo(ExitReason.POWEROFF, status=self._guest_status))
        else:
            self._end(ExitInfo(ExitReason.REBOOT))

    def _end(self, info: ExitInfo) -> None:
        if info.reason is ExitReason.TRIPLE_FAULT and self.console_out.panicked:
            info = ExitInfo(ExitReason.PANIC, detail="kernel panic")
        with self._lock:
            if self._exit is not None:
                return
            self._exit = info
            self.state = "Exited"
            self._lock.notify_all()
        log.info("microVM ended: %s %s", info.reason.value, info.detail)
        self._kick_all()

    def _kick_all(self) -> None:
        for loop, thread in zip(self._loops, self._threads):
            loop.vcpu.immediate_exit = 1
            if thread.ident is not None and thread is not threading.current_thread():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    # ---- lifecycle ------------------------------------------------------
    def pause(self) -> None:
        with self._lock:
            if self.state != "Running":
                raise EmberError(f"cannot pause a microVM that is {self.state.lower()}")
            self._paused = True
        self._kick_all()
        with self._lock:
            self._wait_parked()
            if self._exit is None:
                self.state = "Paused"

    def _wait_parked(self, deadline: float | None = None) -> bool:
        """With the lock held and _paused set: wait until every vCPU thread has parked (or
        the VM ended, or ``deadline`` passed); whether all parked."""
        while self._parked < len(self._loops) and self._exit is None:
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._lock.wait(timeout=1 if deadline is None else 0.1)
        return self._parked == len(self._loops)

    def resume(self) -> None:
        with self._lock:
            if self.state != "Paused":
                raise EmberError(f"cannot resume a microVM that is {self.state.lower()}")
            self._paused = False
            self.state = "Running"
            self._lock.notify_all()

    def send_ctrl_alt_del(self) -> None:
        """Firecracker's SendCtrlAltDel: without a keyboard driver, a reset request."""
        if self.state not in ("Running", "Paused"):
            raise EmberError("the microVM is not running")
        self._end(ExitInfo(ExitReason.REBOOT, detail="Ctrl-Alt-Del"))

    def stop(self) -> None:
        self._end(ExitInfo(ExitReason.STOPPED, detail="stopped by the host"))

    def wait(self, timeout: float | None = None) -> ExitInfo | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._exit is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._lock.wait(timeout=left if left is not None else 1.0)
        for thread in self._threads:
            thread.join(timeout=5)
        self._teardown()
        return self._exit

    def metrics(self) -> dict:
        live = ExitStats()
        live.merge(self.exit_stats)
        if self.state != "Exited":
            for loop in self._loops:
                live.merge(loop.stats)
        if self.coalesced is not None:
            live.coalesced.update(dict(self.coalesced.stats))
        return {
            "state": self.state,
            "boot_time_us": None if self.boot_time_ns is None else self.boot_time_ns // 1000,
            "guest_boot_time_us": None if self.guest_boot_ns is None else self.guest_boot_ns // 1000,
            "vcpus": len(self._loops),
            "exits": live.as_dict(),
            "uart": {"tx_bytes": self.console_out.bytes_out} if hasattr(self, "console_out") else {},
            "pio_bus": self.pio_bus.stats() if hasattr(self, "pio_bus") else {},
            "mmio_bus": self.mmio_bus.stats() if hasattr(self, "mmio_bus") else {},
            **self._device_metrics(),
        }

    def _device_metrics(self) -> dict[str, dict[str, int]]:
        """Each virtio device's counters as Firecracker names them: ``block_<drive id>`` and
        ``net_<iface id>`` with their sums in ``block`` and ``net``, and ``entropy``."""
        groups: dict[str, dict[str, int]] = {}
        for name, transport in self.virtio_devices.items():
            counters = transport.device.metrics()
            if not counters:
                continue
            kind, _, ident = name.partition(":")
            if ident:
                groups[f"{kind}_{ident}"] = counters
                total = groups.setdefault(kind, dict.fromkeys(counters, 0))
                for key, value in counters.items():
                    total[key] += value
            else:
                groups[_METRIC_GROUP.get(kind, kind)] = counters
        return groups

    def state_report(self) -> str:
        """Where a stuck VM's vCPUs are (registers read with the VM stopped for a moment),
        what its devices wait for: each virtio device's interrupt state and queue indices,
        and the ACKs KVM holds for replay (stackdump, on SIGUSR2)."""
        lines = [f"ember: microVM {self.state}; exits {self.metrics()['exits']['total']}"]
        lines += self._vcpu_report()
        if self.coalesced is not None:
            lines.append(f"  coalesced ring: {'writes waiting' if self.coalesced.pending() else 'empty'}")
        lines.append(f"  serial0: {self.serial.describe()}")
        for name, transport in self.virtio_devices.items():
            lines.append(f"  {name}: " + transport.describe().replace("\n", "\n  "))
        return "\n".join(lines)

    def _vcpu_report(self, wait_s: float = 3.0) -> list[str]:
        """One line per vCPU: its registers and run state. A running VM is held, its vCPUs
        out of KVM_RUN, just long enough to read them, then let go; a paused one is read as is."""
        with self._lock:
            if self.state == "Paused":
                return self._vcpu_lines()
            if self.state != "Running" or self._paused:
                return []
            self._paused = True
        try:
            self._kick_all()
            with self._lock:
                if not self._wait_parked(time.monotonic() + wait_s):
                    return [f"  vCPUs: {self._parked} of {len(self._loops)} stopped within {wait_s:g} s for the report"]
            return self._vcpu_lines()
        finally:
            with self._lock:
                self._paused = False
                self._lock.notify_all()

    def _vcpu_lines(self) -> list[str]:
        return [f"  {describe_vcpu(loop.vcpu)}" for loop in self._loops]

    def _teardown(self) -> None:
        stackdump.remove_report(self.state_report)
        closers, self._closers = self._closers, []
        for obj in reversed(closers):
            try:
                obj.close()
            except Exception:
                log.debug("closing %r failed", obj, exc_info=True)

    def __enter__(self) -> "MicroVM":
        return self

    def __exit__(self, *exc) -> None:
        if self.state in ("Running", "Paused"):
            self.stop()
            self.wait(timeout=10)
        self._teardown()
