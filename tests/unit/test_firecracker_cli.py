"""``ember-firecracker``: Firecracker's flags, errors and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ember.api import firecracker_cli as cli
from test_api_support import ApiClient, FakeExit, FakeMachine, fake_factory


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.api.firecracker_cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def config_file(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(bytes(4096))
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 reboot=k"},
        "drives": [{"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": True,
                    "is_read_only": False}],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
    }
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    return path


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("Ember v") and "Firecracker API v" in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--no-api"], "--no-api requires --config-file"),
    (["--id", "bad id!"], "invalid --id"),
    (["--start-time-us", "soon"], "invalid int value"),
    (["--metadata", "/tmp/m.json"], "MMDS"),
])
def test_bad_flags_one_line_error(args, words):
    result = run_cli(*args)
    assert result.returncode == cli.EXIT_ARG_PARSING
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_bad_log_level(tmp_path):
    result = run_cli("--no-api", "--config-file", "x.json", "--level", "Loud")
    assert result.returncode == cli.EXIT_ARG_PARSING and "invalid log level" in result.stderr


def test_config_file_boots_without_api(config_file, tmp_path, capsys):
    FakeMachine.instances.clear()
    factory = fake_factory(exit_at_start=FakeExit("reboot"))
    log_path = tmp_path / "fc.log"
    code = cli.main(["--no-api", "--config-file", str(config_file), "--log-path", str(log_path),
                     "--level", "Info", "--no-seccomp", "--boot-timer"], machine_factory=factory)
    assert code == 0
    vm = FakeMachine.instances[-1]
    assert vm.calls == ["start"]
    assert vm.config.machine_config.vcpu_count == 2 and vm.config.drives[0].drive_id == "rootfs"
    assert "[anonymous-instance:main] Running Ember v" in log_path.read_text()


def test_guest_status_becomes_exit_status(config_file, tmp_path):
    log_path = tmp_path / "fc.log"
    factory = fake_factory(exit_at_start=FakeExit("poweroff", status=3))
    assert cli.main(["--no-api", "--config-file", str(config_file), "--log-path", str(log_path)],
                    machine_factory=factory) == 3
    assert "microVM exited" not in log_path.read_text()  # a guest's own status is not a VMM warning
    factory = fake_factory(exit_at_start=FakeExit("triple-fault"))
    assert cli.main(["--no-api", "--config-file", str(config_file), "--log-path", str(log_path)],
                    machine_factory=factory) == 1
    assert "microVM exited: FakeExit(reason='triple-fault'" in log_path.read_text()  # at the default level


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"boot-source": {"kernel_image_path": "/no/such/kernel"}}')
    assert cli.main(["--no-api", "--config-file", str(bad)], machine_factory=fake_factory()) == \
        cli.EXIT_BAD_CONFIGURATION
    assert "kernel" in capsys.readouterr().err
    assert cli.main(["--no-api", "--config-file", str(tmp_path / "missing.json")],
                    machine_factory=fake_factory()) == cli.EXIT_BAD_CONFIGURATION


def test_config_file_and_api_together(config_file, tmp_path):
    """With --config-file and an API socket, the API sees the running VM; the VM's end ends the process."""
    FakeMachine.instances.clear()
    sock = tmp_path / "fc.sock"
    metrics = tmp_path / "fc.metrics"
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=cli.main(
        ["--api-sock", str(sock), "--config-file", str(config_file), "--id", "vm-7",
         "--metrics-path", str(metrics)], machine_factory=fake_factory())))
    thread.start()
    deadline = time.monotonic() + 10
    while not (sock.exists() and FakeMachine.instances) and time.monotonic() < deadline:
        time.sleep(0.02)
    client = ApiClient(str(sock))
    try:
        info = client.call("GET", "/")[1]
        assert info["id"] == "vm-7" and info["state"] == "Running"
        assert client.call("PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
        assert client.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204
    finally:
        client.close()
    thread.join(10)
    assert result == {"code": 0}
    assert not sock.exists()  # the socket is removed on exit
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["vmm"]["exits"] == {"io": 3} and line["uart"] == {"tx_bytes": 42}


def test_api_socket_in_use(tmp_path):
    sock = tmp_path / "fc.sock"
    sock.write_text("")
    result = run_cli("--api-sock", str(sock))
    assert result.returncode == cli.EXIT_GENERIC
    assert "Failed to open the API socket" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_stops_api_only_process(tmp_path):
    sock = tmp_path / "fc.sock"
    proc = subprocess.Popen([sys.executable, "-m", "ember.api.firecracker_cli", "--api-sock", str(sock)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = ApiClient(str(sock))
        assert client.call("GET", "/")[1]["state"] == "Not started"
        client.close()
        proc.terminate()
        assert proc.wait(timeout=10) == 128 + 15
        assert not os.path.exists(sock)
    finally:
        proc.kill()
