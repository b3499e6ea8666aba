"""Boot the default guest (real Linux) and check what the issue promises.

Runs where the host KVM has hardware virtualization, else inside the rig
(tests/system/conftest.py decides). Each test is one `ember run`, as a user
would type it.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.system.vmproc import run_ember

pytestmark = pytest.mark.system

BOOT_TIMEOUT = 240


def ember_run(*args: str, timeout: float = BOOT_TIMEOUT, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_ember("run", "--no-rig", *args, timeout=timeout, prefix=prefix)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_default_guest_runs_a_command_on_every_vcpu(vcpus):
    result = ember_run("--vcpus", str(vcpus), "--verbose", "--",
                       "echo guest-says-hello; grep -c ^processor /proc/cpuinfo; "
                       "cat /sys/devices/system/clockevents/clockevent*/current_device")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "guest-says-hello" in lines
    at = lines.index("guest-says-hello")
    assert lines[at + 1].strip() == str(vcpus)
    # every vCPU's timer is the TSC deadline (one MSR write to program, not three or four APIC accesses)
    assert [line.strip() for line in lines[at + 2:at + 2 + vcpus]] == ["lapic-deadline"] * vcpus
    assert "boot time to init" in result.stderr
    assert "not reported" not in result.stderr  # init wrote the boot-timer marker


def test_command_exit_status_reaches_the_host():
    result = ember_run("--", "exit 3")
    assert result.returncode == 3, result.stderr


def test_guest_reboot_ends_the_vm_with_reboot_status():
    result = ember_run("--", "reboot")
    assert result.returncode == 64, result.stderr


def test_guest_panic_is_reported():
    result = ember_run("--", "echo c > /proc/sysrq-trigger")
    assert result.returncode in (66,), (result.returncode, result.stdout[-2000:], result.stderr)


def test_boot_from_the_ext4_root_file_system(tmp_path):
    import shutil

    from ember import images

    rootfs = tmp_path / "rootfs.ext4"
    shutil.copyfile(images.artifact_path("rootfs", build=False), rootfs)
    result = ember_run("--rootfs", str(rootfs), "--",
                       "mount | grep ' / '; cat /proc/cmdline; echo written-on-root > /root/mark; sync")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert " on / type ext4 (rw" in result.stdout  # the kernel names the root device /dev/root
    assert "root=/dev/vda" in result.stdout
    dumped = subprocess.run(["debugfs", "-R", "cat /root/mark", str(rootfs)], capture_output=True, text=True)
    assert dumped.stdout.strip() == "written-on-root"


def _mmio_exits(stderr: str) -> int:
    match = re.search(r"│\s*mmio\s*│\s*(\d+)\s*│", stderr)
    assert match, stderr[-3000:]
    return int(match.group(1))


def test_register_loads_exit_only_when_asked():
    """By default the guest reads virtio registers from a read-only page (no exit);
    --register-exits serves every load through an exit, which the exit table shows."""
    command = "head -c 64 /dev/hwrng | wc -c"
    mirrored = ember_run("--verbose", "--", command)
    exiting = ember_run("--verbose", "--register-exits", "--", command)
    for result in (mirrored, exiting):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "64" in result.stdout.split(), result.stdout[-2000:]
    # virtio-rng's probe alone reads a dozen registers; each interrupt reads InterruptStatus.
    assert _mmio_exits(exiting.stderr) >= _mmio_exits(mirrored.stderr) + 12, (mirrored.stderr, exiting.stderr)
