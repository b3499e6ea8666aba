"""The Firecracker-compatible API over a real Unix socket, with a fake MicroVM."""

from __future__ import annotations

import json
import socket
import threading

import msgspec
import pytest

from ember.api.server import ApiServer
from ember.errors import EmberError
from test_api_support import ApiClient, FakeMachine, serving

NOT_AFTER = "The requested operation is not supported after starting the microVM."
NOT_BEFORE = "The requested operation is not supported before starting the microVM."


@pytest.fixture
def files(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(b"070701")
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(bytes(4096))
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(bytes(4096))
    return {"kernel": str(kernel), "initrd": str(initrd), "rootfs": str(rootfs), "scratch": str(scratch)}


@pytest.fixture
def api(tmp_path):
    FakeMachine.instances.clear()
    with serving(tmp_path) as (ctl, client):
        yield ctl, client


def configure(client, files):
    assert client.call("PUT", "/boot-source", {"kernel_image_path": files["kernel"],
                                               "boot_args": "console=ttyS0"})[0] == 204
    assert client.call("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": files["rootfs"],
                                                 "is_root_device": True, "is_read_only": False})[0] == 204


def start(client):
    assert client.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)


def fault(client, method, path, body=None, raw=None):
    status, payload = client.call(method, path, body, raw=raw)
    assert status == 400, payload
    assert set(payload) == {"fault_message"}
    return payload["fault_message"]


# ---- queries ---------------------------------------------------------------
def test_describe_instance_and_version(api):
    _, client = api
    status, info = client.call("GET", "/")
    assert status == 200
    assert info == {"app_name": "Ember", "id": "anonymous-instance", "state": "Not started",
                    "vmm_version": info["vmm_version"]}
    status, version = client.call("GET", "/version")
    assert status == 200 and set(version) == {"firecracker_version"}


def test_machine_config_defaults_and_put(api):
    _, client = api
    status, mc = client.call("GET", "/machine-config")
    assert status == 200 and mc["vcpu_count"] == 1 and mc["smt"] is False
    assert client.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512}) == (204, None)
    assert client.call("GET", "/machine-config")[1]["mem_size_mib"] == 512


def test_machine_config_put_resets_unset_fields_and_patch_keeps_them(api):
    _, client = api
    client.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 512, "track_dirty_pages": True})
    assert client.call("PATCH", "/machine-config", {"vcpu_count": 4}) == (204, None)
    mc = client.call("GET", "/machine-config")[1]
    assert (mc["vcpu_count"], mc["mem_size_mib"], mc["track_dirty_pages"]) == (4, 512, True)
    client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
    assert client.call("GET", "/machine-config")[1]["track_dirty_pages"] is False


@pytest.mark.parametrize("body, words", [
    ({"vcpu_count": 2}, "mem_size_mib"),
    ({"vcpu_count": 0, "mem_size_mib": 128}, "vcpu_count"),
    ({"vcpu_count": 33, "mem_size_mib": 128}, "vcpu_count"),
    ({"vcpu_count": "2", "mem_size_mib": 128}, "Expected `int`"),
    ({"vcpu_count": 2, "mem_size_mib": 128, "turbo": True}, "unknown field `turbo`"),
    ({"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, "SMT"),
    ({"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}, "page size"),
    ({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}, "not supported"),
])
def test_machine_config_bad_input_changes_nothing(api, body, words):
    _, client = api
    before = client.call("GET", "/vm/config")[1]
    assert words in fault(client, "PUT", "/machine-config", body)
    assert client.call("GET", "/vm/config")[1] == before


# ---- boot source and drives -------------------------------------------------
def test_boot_source(api, files):
    _, client = api
    body = {"kernel_image_path": files["kernel"], "initrd_path": files["initrd"], "boot_args": "quiet"}
    assert client.call("PUT", "/boot-source", body) == (204, None)
    assert client.call("GET", "/vm/config")[1]["boot-source"] == body


@pytest.mark.parametrize("body, words", [
    ({"kernel_image_path": "/no/such/vmlinux"}, "The kernel file cannot be opened"),
    ({"kernel_image_path": "KERNEL", "initrd_path": "/no/such/initrd"}, "The initrd file cannot be opened"),
    ({"kernel_image_path": "/"}, "Is a directory"),
    ({"kernel_image_path": 7}, "Expected `str`, got `int`"),
    ({"boot_args": "x"}, "missing required field `kernel_image_path`"),
    ({"kernel_image_path": "KERNEL", "bogus": 1}, "unknown field `bogus`"),
])
def test_boot_source_bad_input_changes_nothing(api, files, body, words):
    _, client = api
    body = {k: (files["kernel"] if v == "KERNEL" else v) for k, v in body.items()}
    assert words in fault(client, "PUT", "/boot-source", body)
    assert client.call("GET", "/vm/config")[1]["boot-source"] is None


def test_malformed_json_and_wrong_shapes(api):
    _, client = api
    assert "deserializing the json body" in fault(client, "PUT", "/boot-source", raw=b'{"kernel_image_path": ')
    assert "deserializing the json body" in fault(client, "PUT", "/boot-source", raw=b"[1, 2]")
    assert "deserializing the json body" in fault(client, "PUT", "/actions", raw=b"\xff\xfe")
    assert fault(client, "PUT", "/boot-source", raw=b"") == "Empty PUT request."
    assert fault(client, "PATCH", "/vm", raw=b"") == "Empty PATCH request."
    assert fault(client, "GET", "/", raw=b"{}") == "GET request cannot have a body."


def test_drives_put_replace_and_errors(api, files):
    _, client = api
    configure(client, files)
    scratch = {"drive_id": "scratch", "path_on_host": files["scratch"], "is_root_device": False,
               "is_read_only": True}
    assert client.call("PUT", "/drives/scratch", scratch) == (204, None)
    scratch["is_read_only"] = False
    assert client.call("PUT", "/drives/scratch", scratch) == (204, None)
    drives = client.call("GET", "/vm/config")[1]["drives"]
    assert [d["drive_id"] for d in drives] == ["rootfs", "scratch"]
    assert drives[1]["is_read_only"] is False
    before = client.call("GET", "/vm/config")[1]
    second_root = dict(scratch, drive_id="root2", is_root_device=True)
    assert fault(client, "PUT", "/drives/root2", second_root) == "A root block device already exists!"
    assert "does not match" in fault(client, "PUT", "/drives/other", scratch)
    missing = dict(scratch, drive_id="gone", path_on_host="/no/such/disk")
    assert "Unable to open the block device backing file" in fault(client, "PUT", "/drives/gone", missing)
    assert fault(client, "PUT", "/drives/", scratch) == "The ID cannot be empty."
    assert "alphanumeric" in fault(client, "PUT", "/drives/bad-id", scratch)
    assert "unknown field" in fault(client, "PUT", "/drives/scratch", dict(scratch, size=1))
    assert client.call("GET", "/vm/config")[1] == before


def test_network_interfaces(api):
    _, client = api
    eth0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}
    assert client.call("PUT", "/network-interfaces/eth0", eth0) == (204, None)
    before = client.call("GET", "/vm/config")[1]
    assert before["network-interfaces"][0]["host_dev_name"] == "tap0"
    dup_tap = {"iface_id": "eth1", "host_dev_name": "tap0"}
    assert "already in use" in fault(client, "PUT", "/network-interfaces/eth1", dup_tap)
    dup_mac = {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:00:02"}
    assert "already in use" in fault(client, "PUT", "/network-interfaces/eth1", dup_mac)
    bad_mac = {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00"}
    assert "Invalid MAC" in fault(client, "PUT", "/network-interfaces/eth1", bad_mac)
    assert client.call("GET", "/vm/config")[1] == before
    assert fault(client, "PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}) == NOT_BEFORE


def test_vsock_entropy(api):
    _, client = api
    assert client.call("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}) == (204, None)
    assert client.call("PUT", "/entropy", {}) == (204, None)
    cfg = client.call("GET", "/vm/config")[1]
    assert cfg["vsock"]["guest_cid"] == 3 and cfg["entropy"] == {"rate_limiter": None}
    assert "guest_cid" in fault(client, "PUT", "/vsock", {"guest_cid": 2, "uds_path": "/tmp/v.sock"})
    assert client.call("GET", "/vm/config")[1]["vsock"]["guest_cid"] == 3


# ---- lifecycle --------------------------------------------------------------
def test_instance_start_without_kernel(api):
    _, client = api
    msg = fault(client, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert msg == "Cannot start microvm without kernel configuration."
    assert client.call("GET", "/")[1]["state"] == "Not started"


def test_lifecycle_and_wrong_state_calls(api, files):
    ctl, client = api
    assert fault(client, "PATCH", "/vm", {"state": "Paused"}) == NOT_BEFORE
    assert fault(client, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == NOT_BEFORE
    assert fault(client, "PATCH", "/drives/rootfs", {"drive_id": "rootfs"}) == NOT_BEFORE
    configure(client, files)
    start(client)
    vm = FakeMachine.instances[-1]
    assert vm.config.boot_source.kernel_image_path == files["kernel"]
    assert client.call("GET", "/")[1]["state"] == "Running"
    assert fault(client, "PUT", "/actions", {"action_type": "InstanceStart"}) == NOT_AFTER
    assert fault(client, "PUT", "/boot-source", {"kernel_image_path": files["kernel"]}) == NOT_AFTER
    assert fault(client, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == NOT_AFTER
    assert fault(client, "PATCH", "/machine-config", {"vcpu_count": 2}) == NOT_AFTER
    assert fault(client, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/x"}) == NOT_AFTER
    assert client.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert client.call("GET", "/")[1]["state"] == "Paused"
    assert "cannot pause" in fault(client, "PATCH", "/vm", {"state": "Paused"})
    assert "Invalid enum value 'Stopped'" in fault(client, "PATCH", "/vm", {"state": "Stopped"})
    assert client.call("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert vm.calls == ["start", "pause", "resume"]
    assert client.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    assert vm.wait(1).reason == "reboot"


def test_patch_drive_after_start(api, files):
    _, client = api
    configure(client, files)
    start(client)
    limiter = {"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 100, "refill_time": 10}}}
    assert client.call("PATCH", "/drives/rootfs", limiter) == (204, None)
    assert "Invalid block device ID" in fault(client, "PATCH", "/drives/nope", {"drive_id": "nope"})
    media = {"drive_id": "rootfs", "path_on_host": files["scratch"]}
    assert "not supported" in fault(client, "PATCH", "/drives/rootfs", media)  # FakeMachine has no update_drive
    assert "unknown field" in fault(client, "PATCH", "/drives/rootfs", {"drive_id": "rootfs", "is_read_only": True})
    drive = client.call("GET", "/vm/config")[1]["drives"][0]
    assert drive["path_on_host"] == files["rootfs"] and drive["rate_limiter"]["ops"]["size"] == 100


def test_patch_drive_media_change_uses_update_drive(api, files):
    _, client = api
    configure(client, files)
    start(client)
    vm = FakeMachine.instances[-1]
    vm.update_drive = lambda drive_id, path: vm.calls.append(f"update {drive_id} {path}")
    assert client.call("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": files["scratch"]})[0] == 204
    assert vm.calls[-1] == f"update rootfs {files['scratch']}"
    assert client.call("GET", "/vm/config")[1]["drives"][0]["path_on_host"] == files["scratch"]


def test_start_failure_is_400_and_leaves_vm_unstarted(tmp_path, files):
    with serving(tmp_path, fail_start="cannot open /dev/kvm: No such file") as (_, client):
        configure(client, files)
        msg = fault(client, "PUT", "/actions", {"action_type": "InstanceStart"})
        assert msg == "Start microvm error: cannot open /dev/kvm: No such file"
        assert client.call("GET", "/")[1]["state"] == "Not started"
        assert client.call("PUT", "/boot-source", {"kernel_image_path": files["kernel"]})[0] == 204


def test_unknown_and_unsupported_paths(api):
    _, client = api
    assert fault(client, "PUT", "/vm", {"state": "Paused"}) == "Invalid request method and/or path: PUT vm."
    assert fault(client, "DELETE", "/drives/x") == "Invalid request method and/or path: DELETE drives/x."
    assert fault(client, "GET", "/nothing/here").startswith("Invalid request method and/or path")
    for method, path in [("PUT", "/snapshot/create"), ("PUT", "/snapshot/load"), ("PUT", "/balloon"),
                         ("GET", "/balloon/statistics"), ("PUT", "/mmds"), ("PUT", "/mmds/config"),
                         ("PUT", "/cpu-config"), ("PUT", "/hotplug/memory")]:
        body = None if method == "GET" else {"x": 1}
        assert "is not supported" in fault(client, method, path, body)


def test_openapi_served(api):
    _, client = api
    status, spec = client.call("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.") and "/drives/{drive_id}" in spec["paths"]


# ---- logger and metrics ------------------------------------------------------
def test_logger_and_metrics_endpoints(api, tmp_path):
    ctl, client = api
    log_path, metrics_path = tmp_path / "fc.log", tmp_path / "fc.metrics"
    body = {"log_path": str(log_path), "level": "Info", "show_level": True, "show_log_origin": True}
    assert client.call("PUT", "/logger", body) == (204, None)
    assert client.call("PUT", "/metrics", {"metrics_path": str(metrics_path)}) == (204, None)
    assert fault(client, "PUT", "/metrics", {"metrics_path": str(metrics_path)}) == \
        "Reinitialization of metrics not allowed."
    assert "level" in fault(client, "PUT", "/logger", {"level": "Loud"})
    assert "Failed to open target file" in fault(client, "PUT", "/logger", {"log_path": "/no/such/dir/log"})
    client.call("GET", "/machine-config")
    assert client.call("PUT", "/actions", {"action_type": "FlushMetrics"}) == (204, None)
    lines = metrics_path.read_text().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics["utc_timestamp_ms"] > 0
    assert metrics["get_api_requests"]["machine_cfg_count"] == 1
    assert metrics["put_api_requests"]["metrics_fails"] == 1
    assert "block_rootfs" not in metrics  # no machine yet
    text = log_path.read_text()
    assert "[anonymous-instance:" in text and ":INFO:ember/api/" in text
    ctl.logs.close()


def test_device_metrics_count_since_the_last_line_and_the_vmm_group_totals(api, files, tmp_path):
    """Firecracker's device groups (uart, block_<id>...) are deltas per metrics line;
    Ember's own machine counters under vmm stay totals."""
    ctl, client = api
    metrics_path = tmp_path / "fc.metrics"
    assert client.call("PUT", "/metrics", {"metrics_path": str(metrics_path)}) == (204, None)
    configure(client, files)
    start(client)
    for _ in range(3):
        assert client.call("PUT", "/actions", {"action_type": "FlushMetrics"}) == (204, None)
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    # the fake's totals grow by one 4 KiB read per line: each line shows that one read
    assert [line["block_rootfs"] for line in lines] == [{"read_count": 1, "read_bytes": 4096}] * 3
    assert [line["uart"]["tx_bytes"] for line in lines] == [42, 0, 0]
    assert all(line["vmm"]["exits"] == {"io": 3} for line in lines)


# ---- transport ---------------------------------------------------------------
def test_keep_alive_and_raw_http(api):
    ctl, client = api
    for _ in range(5):  # one connection, several requests
        assert client.call("GET", "/")[0] == 200
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(client.conn.unix_path)
    sock.sendall(b"GARBAGE\r\n\r\n")
    reply = b""
    while chunk := sock.recv(4096):  # the server closes after a malformed request
        reply += chunk
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply and b"fault_message" in reply
    sock.close()


def test_payload_limit(api):
    _, client = api
    status, payload = client.call("PUT", "/boot-source", raw=b"{" + b" " * 60000 + b"}")
    assert status == 413 and "larger than the limit" in payload["fault_message"]


def test_existing_socket_path_refused(tmp_path):
    path = tmp_path / "taken.sock"
    path.write_text("")
    from ember.api.controller import VmmController
    with pytest.raises(EmberError, match="Failed to open the API socket"):
        ApiServer(str(path), VmmController())


def test_concurrent_requests_are_serialized(api, files):
    _, client = api
    configure(client, files)
    path = client.conn.unix_path
    errors = []

    def worker(n):
        c = ApiClient(path)
        try:
            for i in range(10):
                body = {"iface_id": f"eth{n}", "host_dev_name": f"tap{n}_{i % 2}"}
                status, _ = c.call("PUT", f"/network-interfaces/eth{n}", body)
                if status != 204:
                    errors.append(status)
                c.call("PATCH", "/machine-config", {"vcpu_count": n + 1})
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    ifaces = client.call("GET", "/vm/config")[1]["network-interfaces"]
    assert sorted(i["iface_id"] for i in ifaces) == [f"eth{n}" for n in range(6)]


def test_patched_rate_limiters_merge_by_bucket_and_reach_the_running_devices(api, files):
    """Firecracker's update: a bucket given replaces the old one, one left out stays."""
    _, client = api
    configure(client, files)
    start(client)
    vm = FakeMachine.instances[-1]
    applied = []
    vm.set_rate_limiter = lambda device, queue, spec: applied.append((device, queue, msgspec.to_builtins(spec)))
    ops = {"size": 100, "refill_time": 10}
    bandwidth = {"size": 1 << 20, "refill_time": 1000, "one_time_burst": 4096}
    assert client.call("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "rate_limiter": {"ops": ops}})[0] == 204
    assert client.call("PATCH", "/drives/rootfs",
                       {"drive_id": "rootfs", "rate_limiter": {"bandwidth": bandwidth}})[0] == 204
    assert applied == [("block:rootfs", 0, {"ops": ops}), ("block:rootfs", 0, {"ops": ops, "bandwidth": bandwidth})]
    shown = client.call("GET", "/vm/config")[1]["drives"][0]["rate_limiter"]
    assert shown == {"bandwidth": bandwidth, "ops": {**ops, "one_time_burst": None}}
    negative = {"drive_id": "rootfs", "rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}
    assert "Expected `int` >= 0" in fault(client, "PATCH", "/drives/rootfs", negative)
    assert "unknown field" in fault(client, "PATCH", "/drives/rootfs",
                                    {"drive_id": "rootfs", "rate_limiter": {"iops": ops}})
    assert len(applied) == 2  # refused bodies changed nothing
