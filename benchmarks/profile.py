"""Where Ember's time goes: one block-workload run through the Python API, its exit table kept.

Builds the same guest as `ember run` (ember.config VmConfig, ember.machine
MicroVM) in this process, runs the block workload to the end and returns
``vm.metrics()`` (VM exits by reason and by device, with time spent) and the
event-loop time spent serving each device's queue notifications.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path

from ember import config as cfg
from ember.machine import MicroVM

from benchmarks.console import BenchError
from benchmarks.settings import Settings
from benchmarks.vmbench import block_command
from benchmarks.vmm import Guest

MIB = 1 << 20


def vm_config(guest: Guest, command: str, disk: Path) -> cfg.VmConfig:
    encoded = base64.b64encode(command.encode()).decode()
    return cfg.VmConfig(
        boot_source=cfg.BootSource(kernel_image_path=guest.kernel, initrd_path=guest.initrd,
                                   boot_args=f"{cfg.DEFAULT_BOOT_ARGS} ember.cmd={encoded}"),
        machine_config=cfg.MachineConfig(vcpu_count=guest.vcpus, mem_size_mib=guest.mem_mib),
        drives=[cfg.Drive(drive_id="drive0", path_on_host=str(disk), is_root_device=False)],
        entropy=cfg.Entropy(),
    )


class NotifyTimer:
    """Counts and times a transport's queue notifications (the event-loop thread's device work)."""

    def __init__(self, transport) -> None:
        self.count = 0
        self.total_ns = 0
        self._inner = transport.notify
        transport.notify = self

    def __call__(self, queue: int) -> None:
        start = time.perf_counter_ns()
        try:
            self._inner(queue)
        finally:
            self.count += 1
            self.total_ns += time.perf_counter_ns() - start


def profile_block(guest: Guest, s: Settings, where: str) -> dict:
    """{'exits': ..., 'boot_time_us': ..., 'wall_s': ..., 'where': ...} of one Ember block run."""
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        disk, console = Path(tmp) / "disk.img", Path(tmp) / "console.log"
        with open(disk, "wb") as f:
            f.truncate(s.disk_mib * MIB)
        start = time.monotonic()
        vm = MicroVM(vm_config(guest, block_command(s.disk_mib), disk), console=f"file:{console}")
        vm.start()
        timers = {name: NotifyTimer(transport) for name, transport in vm.virtio_devices.items()}
        info = vm.wait(timeout=s.vm_timeout_s)
        metrics = vm.metrics()
        if info is None:
            vm.stop()
            vm.wait(timeout=10)
            raise BenchError(f"the profiled Ember run did not end within {s.vm_timeout_s:g} s")
        wall = time.monotonic() - start
    return {"exits": metrics["exits"], "boot_time_us": metrics["boot_time_us"], "wall_s": wall,
            "where": where, "ended": info.describe(),
            "notify": {name: {"count": t.count, "total_ns": t.total_ns} for name, t in timers.items()}}
