"""virtio-net with a real Linux guest, on a TAP inside a private network namespace.

Each test makes its own namespace (ember-t-<random>) holding tap0 = 10.0.2.2/24
and runs `ember run --net tap0` and the host-side servers there, so it
touches no other network; the guest is 10.0.2.15. Checks: ping, and a file
each way over TCP (HTTP download with busybox wget, upload with busybox nc),
with sha256 compared on both sides.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.system.vmproc import run_ember

pytestmark = pytest.mark.system

BOOT_TIMEOUT = 300
HOST_IP, GUEST_IP, PREFIX = "10.0.2.2", "10.0.2.15", 24
HTTP_PORT, SINK_PORT = 8000, 9000
TAP = "tap0"
BLOB_BYTES = 1 << 20
PING_RTT = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")

# The host side, run inside the namespace: HTTP files from a directory, and a TCP sink that
# writes what it receives to DIR/upload, then answers "<length> <sha256>\n".
SERVERS = r'''
import hashlib, http.server, functools, os, socket, socketserver, sys, threading, time
root, host, http_port, sink_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
httpd = socketserver.ThreadingTCPServer((host, http_port), handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
sink = socket.create_server((host, sink_port))
print("ready", flush=True)
while True:
    conn, _ = sink.accept()
    with conn:
        start, data = time.monotonic(), bytearray()
        while chunk := conn.recv(65536):
            data += chunk
        took = time.monotonic() - start
        with open(os.path.join(root, "upload"), "wb") as f:
            f.write(data)
        with open(os.path.join(root, "upload.seconds"), "w") as f:
            f.write(str(took))
        conn.sendall(b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode()))
'''


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextmanager
def namespace_with_tap():
    """A fresh network namespace holding tap0 (HOST_IP/PREFIX, up); deleted afterwards."""
    ns = f"ember-t-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", ns)
    try:
        inside = ("ip", "netns", "exec", ns)
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "tuntap", "add", TAP, "mode", "tap")
        sh(*inside, "ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP)
        sh(*inside, "ip", "link", "set", TAP, "up")
        yield inside
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def guest_net_up() -> str:
    return (f"ip link set lo up; ip addr add {GUEST_IP}/{PREFIX} dev eth0; ip link set eth0 up; "
            f"ip -o addr show eth0 | grep -q {GUEST_IP} || exit 90; ")


def ember_run_in(inside: tuple[str, ...], script: str, *extra: str) -> subprocess.CompletedProcess:
    return run_ember("run", "--no-rig", "--net", TAP, *extra, "--", script, timeout=BOOT_TIMEOUT, prefix=inside)


def test_guest_pings_the_host_side_of_its_tap():
    with namespace_with_tap() as inside:
        result = ember_run_in(inside, guest_net_up() + f"ping -c 3 {HOST_IP}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 packets transmitted, 3 packets received" in result.stdout, result.stdout[-2000:]
    rtt = PING_RTT.search(result.stdout)
    assert rtt, result.stdout[-2000:]
    print(f"ping {HOST_IP} from the guest: min/avg/max {rtt.group(1)}/{rtt.group(2)}/{rtt.group(3)} ms")


@contextmanager
def host_servers(inside: tuple[str, ...], root: Path):
    proc = subprocess.Popen([*inside, sys.executable, "-c", SERVERS, str(root), HOST_IP, str(HTTP_PORT),
                             str(SINK_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
        yield proc
    finally:
        proc.kill()
        proc.wait()


def uptime() -> str:
    return "$(cut -d' ' -f1 /proc/uptime)"


def test_files_cross_the_network_both_ways(tmp_path):
    blob = os.urandom(BLOB_BYTES)
    (tmp_path / "blob").write_bytes(blob)
    script = guest_net_up() + (
        f"a={uptime()}; wget -q -O /tmp/blob http://{HOST_IP}:{HTTP_PORT}/blob || exit 91; b={uptime()}; "
        "echo down-sha=$(sha256sum /tmp/blob | cut -d' ' -f1); echo down-s=$a:$b; "
        f"dd if=/dev/urandom of=/tmp/up bs=1024 count={BLOB_BYTES // 1024} 2>/dev/null; "
        "echo up-sha=$(sha256sum /tmp/up | cut -d' ' -f1); "
        f"echo up-answer=$(nc {HOST_IP} {SINK_PORT} </tmp/up | tr ' ' :)"
    )
    with namespace_with_tap() as inside, host_servers(inside, tmp_path):
        result = ember_run_in(inside, script, "--mem", "256")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    found = dict(re.findall(r"^(down-sha|down-s|up-sha|up-answer)=(\S*)\s*$", result.stdout, re.M))
    assert found.get("down-sha") == hashlib.sha256(blob).hexdigest(), result.stdout[-2000:]
    uploaded = (tmp_path / "upload").read_bytes()
    assert len(uploaded) == BLOB_BYTES
    assert found.get("up-sha") == hashlib.sha256(uploaded).hexdigest()
    assert found.get("up-answer") == f"{BLOB_BYTES}:{found['up-sha']}"
    start, end = (float(x) for x in found["down-s"].split(":"))
    up_s = float((tmp_path / "upload.seconds").read_text())
    mib = BLOB_BYTES / (1 << 20)
    print(f"virtio-net: download {mib:.0f} MiB in {end - start:.2f} s ({mib / max(end - start, 0.01):.2f} MiB/s), "
          f"upload in {up_s:.2f} s ({mib / up_s:.2f} MiB/s)")


STREAM_MIB = 24
# What Linux's virtio core and drivers say when a device breaks the ring protocol, kernel
# oopses, and Ember's own log line for a device that needs a reset. (Not "WARNING:": the
# rig's emulated EPYC draws an XSAVE-size warning at every boot, under QEMU as under Ember.)
VIRTIO_TROUBLE = re.compile(r"not a head|id \d+ out of range|[Bb]roken|virtio.*([Ee]rror|fail)|BUG:|needs reset")


# If the streams stall, the guest says what it sees while Ember's own report (on the timeout)
# gives the device side: is the guest alive, did its virtio interrupts stop, is TCP retransmitting.
STALL_REPORT = ("(sleep 150; echo GUEST-STALL; grep -E 'virtio|LOC' /proc/interrupts; "
                "cat /sys/class/net/eth0/statistics/rx_packets /sys/class/net/eth0/statistics/tx_packets; "
                "grep -A1 '^Tcp:' /proc/net/snmp; dmesg | tail -5)")


def test_sustained_tcp_streams_wrap_the_rings_cleanly(tmp_path):
    """Tens of MiB each way: both queues' indices wrap many times; data intact, no driver
    complaint, and no received frame whose buffers the driver saw only part of."""
    piece = os.urandom(BLOB_BYTES)
    (tmp_path / "big").write_bytes(piece * STREAM_MIB)
    script = guest_net_up() + (
        f"{STALL_REPORT} & W=$!; "
        f"wget -q -O - http://{HOST_IP}:{HTTP_PORT}/big | sha256sum | cut -d' ' -f1 | sed 's/^/down-sha=/'; "
        "head -c 1048576 /dev/urandom > /tmp/piece; "
        f"echo up-answer=$(i=0; while [ $i -lt {STREAM_MIB} ]; do cat /tmp/piece; i=$((i+1)); done"
        f" | nc {HOST_IP} {SINK_PORT} | tr ' ' :); "
        "kill $W; "
        f"echo up-sha=$(i=0; while [ $i -lt {STREAM_MIB} ]; do cat /tmp/piece; i=$((i+1)); done"
        " | sha256sum | cut -d' ' -f1); "
        "echo rx-length-errors=$(cat /sys/class/net/eth0/statistics/rx_length_errors); "
        "dmesg | grep -E 'virtio|BUG:'; true"
    )
    with namespace_with_tap() as inside, host_servers(inside, tmp_path):
        result = ember_run_in(inside, script, "--mem", "256")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    found = dict(re.findall(r"^(down-sha|up-sha|up-answer)=(\S*)\s*$", result.stdout, re.M))
    assert found.get("down-sha") == hashlib.sha256(piece * STREAM_MIB).hexdigest(), result.stdout[-2000:]
    total = STREAM_MIB * BLOB_BYTES
    assert found.get("up-answer") == f"{total}:{found.get('up-sha')}", result.stdout[-2000:]
    assert (tmp_path / "upload").stat().st_size == total
    trouble = [line for line in (result.stdout + result.stderr).splitlines() if VIRTIO_TROUBLE.search(line)]
    assert not trouble, trouble
    # Linux counts a frame whose mergeable buffers it saw only some of (VIRTIO 1.2 5.1.6.4.2).
    assert re.search(r"^rx-length-errors=0\s*$", result.stdout, re.M), result.stdout[-2000:]
    up_s = float((tmp_path / "upload.seconds").read_text())
    print(f"virtio-net: {STREAM_MIB} MiB up in {up_s:.1f} s ({STREAM_MIB / up_s:.2f} MiB/s), {STREAM_MIB} MiB down")
