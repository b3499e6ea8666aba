"""The Firecracker-compatible control plane driving a real Linux guest.

A guest configured and booted with curl alone, one booted from
--config-file, pause/resume of a running guest, and a running guest's
drive given new media, all through `ember firecracker` as Firecracker's own
users would drive it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from ember import images
from tests.system.vmproc import expect_ember_status

pytestmark = pytest.mark.system


def guest_args(command: str) -> str:
    encoded = base64.b64encode(command.encode()).decode()
    return f"console=ttyS0 reboot=k panic=-1 quiet i8042.noaux i8042.nomux i8042.dumbkbd ember.cmd={encoded}"


def curl(sock: str, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    argv = ["curl", "-s", "--unix-socket", sock, "-X", method, f"http://localhost{path}",
            "-w", "\n%{http_code}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


def start_firecracker(tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    sock = str(tmp_path / "fc.sock")
    proc = subprocess.Popen([sys.executable, "-m", "ember", "firecracker", "--api-sock", sock, *extra],
                            stdin=subprocess.DEVNULL, stdout=open(tmp_path / "console.log", "wb"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the API socket never appeared"
        time.sleep(0.1)
    return proc, sock


def configure(sock: str, command: str) -> None:
    assert curl(sock, "PUT", "/boot-source", {
        "kernel_image_path": str(images.artifact_path("kernel", build=False)),
        "initrd_path": str(images.artifact_path("initrd", build=False)),
        "boot_args": guest_args(command)}) == (204, "")
    assert curl(sock, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == (204, "")


def test_guest_configured_and_booted_with_curl_alone(tmp_path):
    proc, sock = start_firecracker(tmp_path)
    try:
        configure(sock, "echo booted-over-the-api; grep -c ^processor /proc/cpuinfo")
        assert curl(sock, "PUT", "/actions", {"action_type": "InstanceStart"}) == (204, "")
        code, body = curl(sock, "PUT", "/boot-source", {"kernel_image_path": "/x"})
        assert code == 400 and "fault_message" in json.loads(body)
        expect_ember_status(proc, 0, 240, tmp_path / "console.log")
        console = (tmp_path / "console.log").read_text(errors="replace")
        assert "booted-over-the-api\n2\n" in console.replace("\r", "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_guest_booted_from_config_file(tmp_path):
    config = {
        "boot-source": {"kernel_image_path": str(images.artifact_path("kernel", build=False)),
                        "initrd_path": str(images.artifact_path("initrd", build=False)),
                        "boot_args": guest_args("echo from-config-file; exit 4")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
    }
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    with open(tmp_path / "console.log", "wb") as console:
        result = subprocess.run([sys.executable, "-m", "ember", "firecracker", "--no-api",
                                 "--config-file", str(path)], stdout=console, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, timeout=240)
    assert result.returncode == 4, result.stderr
    assert "from-config-file" in (tmp_path / "console.log").read_text(errors="replace")


def test_pause_and_resume_a_running_guest(tmp_path):
    proc, sock = start_firecracker(tmp_path)
    log = tmp_path / "console.log"
    try:
        configure(sock, "i=0; while [ $i -lt 600 ]; do echo tick-$i; i=$((i+1)); sleep 0.1; done")
        assert curl(sock, "PUT", "/actions", {"action_type": "InstanceStart"}) == (204, "")
        deadline = time.monotonic() + 180
        while "tick-3" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the guest never started ticking"
            time.sleep(0.2)
        assert curl(sock, "PATCH", "/vm", {"state": "Paused"}) == (204, "")
        assert json.loads(curl(sock, "GET", "/")[1])["state"] == "Paused"
        paused_size = log.stat().st_size
        time.sleep(2)
        assert log.stat().st_size == paused_size, "the guest ran while paused"
        assert curl(sock, "PATCH", "/vm", {"state": "Resumed"}) == (204, "")
        deadline = time.monotonic() + 60
        while log.stat().st_size == paused_size:
            assert time.monotonic() < deadline, "the guest did not run again after resume"
            time.sleep(0.2)
        assert json.loads(curl(sock, "GET", "/")[1])["state"] == "Running"
    finally:
        proc.kill()
        proc.wait()


def test_new_media_for_a_running_drive_reaches_the_guest(tmp_path):
    """PATCH /drives/{id} with path_on_host: the guest's virtio-blk driver gets a
    config-change interrupt, sees the new size and reads the new image; the drive's
    metrics count the change and the guest's reads."""
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(b"first-media!".ljust(1 << 20, b"\0"))
    second.write_bytes(b"second-media".ljust(3 << 20, b"\0"))
    size = "cat /sys/block/vda/size"
    script = (f"echo media-size=$({size}); echo ready-for-new-media; i=0; "
              f"while [ $({size}) = 2048 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
              f"echo media-size=$({size}); "
              "echo media-data=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 12)")
    metrics = tmp_path / "fc.metrics"
    proc, sock = start_firecracker(tmp_path, "--metrics-path", str(metrics))
    log = tmp_path / "console.log"
    try:
        configure(sock, script)
        drive = {"drive_id": "data", "path_on_host": str(first), "is_root_device": False, "is_read_only": False}
        assert curl(sock, "PUT", "/drives/data", drive) == (204, "")
        assert curl(sock, "PUT", "/actions", {"action_type": "InstanceStart"}) == (204, "")
        deadline = time.monotonic() + 180
        while "ready-for-new-media" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.2)
        code, body = curl(sock, "PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(tmp_path / "no")})
        assert code == 400 and "fault_message" in json.loads(body)
        assert curl(sock, "PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(second)}) == (204, "")
        expect_ember_status(proc, 0, 240, log)
        lines = log.read_text(errors="replace").replace("\r", "").splitlines()
        assert [line for line in lines if line.startswith("media-")] == [
            "media-size=2048", "media-size=6144", "media-data=second-media"], lines[-30:]
        drive: dict[str, int] = {}  # each line counts since the one before: their sum is the total
        for line in metrics.read_text().splitlines():
            for key, value in json.loads(line).get("block_data", {}).items():
                drive[key] = drive.get(key, 0) + value
        assert (drive["update_count"], drive["update_fails"], drive["execute_fails"]) == (1, 0, 0), drive
        assert drive["read_count"] >= 2 and drive["write_count"] == 0, drive  # the partition scan, then dd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
