"""The two VMMs under test, given the same guest: kernel, initramfs, memory, vCPUs, devices.

Ember runs as ``python -m ember run --no-rig`` (its real CLI); QEMU as
``qemu-system-x86_64 -M microvm`` with KVM, -cpu host, a serial console on
stdio and the same virtio-mmio devices (QEMU docs/system/i386/microvm.rst).
"""

from __future__ import annotations

import base64
import re
import shutil
import sys
from dataclasses import dataclass, field

from ember import config as ember_config

QEMU = "qemu-system-x86_64"
EMBER, QEMU_NAME = "Ember", "QEMU"
VMMS = (EMBER, QEMU_NAME)
# Without ACPI, QEMU names its virtio-mmio devices on the kernel command line (virtio_mmio.device=),
# as Ember does; the guest kernel has no ACPI, so with it the devices would be invisible.
MICROVM = "microvm,acpi=off"
EMBER_BOOT_RE = re.compile(r"boot time to init: ([0-9.]+) ms")
EMBER_GUEST_BOOT_RE = re.compile(r"guest boot time: ([0-9.]+) ms from the first KVM_RUN")


@dataclass(frozen=True)
class Guest:
    """What both VMMs boot: one kernel file, one initramfs, memory and vCPUs."""

    kernel: str
    initrd: str
    mem_mib: int = 256
    vcpus: int = 1


@dataclass(frozen=True)
class Disk:
    """A raw image attached as the guest's first virtio-blk disk (/dev/vda)."""

    path: str


@dataclass(frozen=True)
class Tap:
    """A TAP interface attached as the guest's virtio-net device (eth0), with one MAC for both VMMs."""

    name: str
    mac: str = "02:00:0a:c8:00:02"  # the same MAC keeps the host's neighbour entry right from run to run


@dataclass(frozen=True)
class Launch:
    guest: Guest
    command: str
    disks: list[Disk] = field(default_factory=list)
    tap: Tap | None = None


def boot_args(command: str) -> str:
    """The kernel command line both VMMs get (each adds its own virtio_mmio.device= entries)."""
    encoded = base64.b64encode(command.encode()).decode()
    return f"{ember_config.DEFAULT_BOOT_ARGS} ember.cmd={encoded}"


def ember_argv(launch: Launch) -> list[str]:
    g = launch.guest
    argv = [sys.executable, "-m", "ember", "run", "--no-rig", "--verbose", "--kernel", g.kernel,
            "--initrd", g.initrd, "--mem", str(g.mem_mib), "--vcpus", str(g.vcpus), "--console", "stdio"]
    for disk in launch.disks:
        argv += ["--drive", disk.path]
    if launch.tap is not None:
        argv += ["--net", f"{launch.tap.name},mac={launch.tap.mac}"]
    return [*argv, "--", launch.command]


def qemu_argv(launch: Launch) -> list[str]:
    """QEMU with the device set of `ember run`: serial, virtio-rng, the disks and the NIC."""
    g = launch.guest
    argv = [QEMU, "-M", MICROVM, "-enable-kvm", "-cpu", "host", "-smp", str(g.vcpus), "-m", str(g.mem_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", g.kernel, "-initrd", g.initrd, "-append", boot_args(launch.command),
            "-device", "virtio-rng-device"]
    for index, disk in enumerate(launch.disks):
        # Ember serves a drive with buffered preadv/pwritev: QEMU's writeback cache with a thread pool.
        argv += ["-drive", f"file={disk.path},if=none,id=d{index},format=raw,cache=writeback,aio=threads",
                 "-device", f"virtio-blk-device,drive=d{index}"]
    if launch.tap is not None:
        argv += ["-netdev", f"tap,id=n0,ifname={launch.tap.name},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=n0,mac={launch.tap.mac}"]
    return argv


def argv_for(vmm: str, launch: Launch) -> list[str]:
    return ember_argv(launch) if vmm == EMBER else qemu_argv(launch)


def ember_boot_ms(stderr: str, pattern: re.Pattern[str] = EMBER_BOOT_RE) -> float | None:
    """Ember's own boot-timer figure from `ember run --verbose` (None when absent)."""
    found = pattern.search(stderr)
    return float(found.group(1)) if found else None


def ember_guest_boot_ms(stderr: str) -> float | None:
    """The part of it from the first KVM_RUN on: the guest's own boot, without Ember's start-up."""
    return ember_boot_ms(stderr, EMBER_GUEST_BOOT_RE)


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def run_order(index: int) -> tuple[str, str]:
    """Alternate which VMM goes first, run by run, so neither always enjoys a warm cache."""
    return VMMS if index % 2 == 0 else VMMS[::-1]
