"""VirtIO devices seen from a real Linux guest: block, entropy, and a hostile driver.

Each test boots the default guest with `ember run` and checks the result on
the host side too (the image file after the VM exited).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.system.test_boot import ember_run

pytestmark = pytest.mark.system

DISK_MIB = 32


def make_disk(tmp_path, name="disk.img", mib=DISK_MIB):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    return path


def test_guest_formats_writes_flushes_and_reads_back_a_disk(tmp_path):
    disk = make_disk(tmp_path)
    script = (
        "set -e; mke2fs -q /dev/vda; mkdir -p /mnt/d; mount -t ext2 /dev/vda /mnt/d; "
        "echo persisted-by-ember > /mnt/d/hello.txt; sync; umount /mnt/d; "
        "mount -t ext2 /dev/vda /mnt/d; cat /mnt/d/hello.txt; umount /mnt/d"
    )
    result = ember_run("--drive", str(disk), "--", script)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "persisted-by-ember" in result.stdout
    dumped = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(disk)],
                            capture_output=True, text=True, check=True)
    assert dumped.stdout.strip() == "persisted-by-ember"


def test_raw_writes_reach_the_image_and_read_only_drives_refuse_writes(tmp_path):
    disk = make_disk(tmp_path, "rw.img", 4)
    ro = make_disk(tmp_path, "ro.img", 4)
    script = (
        "printf 'ember-block-%s' data | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null; "
        "dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 16; echo; "
        "if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo ro-write-ok; "
        "else echo ro-write-refused; fi"
    )
    result = ember_run("--drive", str(disk), "--drive", f"{ro},ro", "--verbose", "--", script,
                       prefix=("env", "COLUMNS=250"))  # one table row per line
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "ember-block-data" in result.stdout
    assert "ro-write-refused" in result.stdout
    # --verbose ends with each device's counters: the writable drive wrote and flushed, the other never wrote
    rows = {name: line for line in result.stderr.splitlines() for name in ("block_drive0", "block_drive1")
            if f" {name} " in line}
    assert re.search(r"write_count [1-9].*flush_count [1-9]", rows.get("block_drive0", "")), result.stderr[-3000:]
    assert "read_count" in rows.get("block_drive1", "") and "write_count" not in rows["block_drive1"], rows
    with open(disk, "rb") as f:
        f.seek(8 * 512)
        assert f.read(16) == b"ember-block-data"


def test_guest_reads_entropy_from_virtio_rng():
    script = ("cat /sys/class/misc/hw_random/rng_current; "
              "dd if=/dev/hwrng bs=64 count=4 2>/dev/null | od -An -tx1 | tr -d ' \\n' | wc -c")
    result = ember_run("--", script)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("virtio_rng") for line in lines), result.stdout[-2000:]
    assert "512" in [line.strip() for line in lines]  # 256 random bytes, two hex digits each


def test_hostile_driver_breaks_only_its_own_device(tmp_path):
    """The guest points the entropy device's queue outside RAM and kicks it.

    Ember must mark that device DEVICE_NEEDS_RESET and keep everything else
    (the block device, the console, the VMM itself) working.
    """
    disk = make_disk(tmp_path, "ok.img", 4)
    rng = "0xd0002000"  # window 1: the drive takes window 0, the entropy device the next
    regs = {"sel": 0x30, "ready": 0x44, "notify": 0x50, "desc_lo": 0x80, "desc_hi": 0x84, "status": 0x70}

    def poke(reg, value):
        return f"devmem $(({rng} + {regs[reg]})) 32 {value}; "

    script = (
        f"test $(devmem $(({rng} + 8)) 32) = 0x00000004 || {{ echo not-rng; exit 9; }}; "
        + poke("sel", 0) + poke("ready", 0) + poke("desc_lo", "0xfffff000") + poke("desc_hi", "0xffffffff")
        + poke("ready", 1) + poke("notify", 0)
        + f"echo rng-status=$(devmem $(({rng} + {regs['status']})) 32); "
        "printf survived | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null; "
        "dd if=/dev/vda bs=8 count=1 2>/dev/null; echo"
    )
    result = ember_run("--drive", str(disk), "--", script)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    status_line = next(line for line in result.stdout.splitlines() if line.startswith("rng-status="))
    assert int(status_line.split("=")[1], 16) & 0x40, status_line  # DEVICE_NEEDS_RESET
    assert "survived" in result.stdout
    assert disk.read_bytes()[:8] == b"survived"


def test_a_bandwidth_limited_drive_paces_the_guests_reads(tmp_path):
    """Firecracker's rate_limiter on a drive, from a --config-file: 1 MiB/s (a 256 KiB bucket
    refilled every 250 ms), so reading 3 MiB takes the guest at least 2.75 s. Unlimited, the
    same read takes a few tens of milliseconds even in the rig."""
    import json
    import re
    import sys

    from ember import images
    from tests.system.test_api import guest_args

    disk = make_disk(tmp_path, "limited.img", 4)
    script = ("read t0 _ < /proc/uptime; dd if=/dev/vda of=/dev/null bs=64k count=48 iflag=direct 2>/dev/null; "
              "read t1 _ < /proc/uptime; echo \"paced $t0 $t1\"; exit 5")
    limiter = {"bandwidth": {"size": 256 << 10, "refill_time": 250}}
    config = {
        "boot-source": {"kernel_image_path": str(images.artifact_path("kernel", build=False)),
                        "initrd_path": str(images.artifact_path("initrd", build=False)),
                        "boot_args": guest_args(script)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [{"drive_id": "paced", "path_on_host": str(disk), "is_root_device": False,
                    "is_read_only": True, "rate_limiter": limiter}],
    }
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "ember", "firecracker", "--no-api", "--config-file", str(path)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 5, result.stdout[-3000:] + result.stderr
    found = re.search(r"paced ([0-9.]+) ([0-9.]+)", result.stdout)
    assert found, result.stdout[-3000:]
    assert float(found.group(2)) - float(found.group(1)) >= 2.7, found.group(0)
