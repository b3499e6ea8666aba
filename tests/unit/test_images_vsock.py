"""The guest's vsock pieces: the ember-vsock C helper build, its place in the rootfs, and init's start-up logic."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from ember.errors import EmberError
from ember.images import rootfs, tools

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
INIT = Path(str(resources.files("ember.images").joinpath("init")))
AGENT = Path(str(resources.files("ember.images").joinpath("agent.sh")))
MISSING = [t for t, _ in tools.HELPER_TOOLS.items() if tools.find_tool(t) is None]
needs_cc = pytest.mark.skipif(bool(MISSING),
                              reason=f"host C toolchain missing: {MISSING} (apt-get install gcc libc6-dev)")
needs_busybox = pytest.mark.skipif(not Path(BUSYBOX).exists(),
                                   reason="busybox is not installed (apt-get install busybox-static)")


@pytest.fixture(scope="module")
def helper(tmp_path_factory) -> Path:
    if MISSING:
        pytest.skip(f"host C toolchain missing: {MISSING}")
    out = tmp_path_factory.mktemp("helper")
    data = rootfs.compile_vsock_helper(out)
    path = out / "ember-vsock-test"
    path.write_bytes(data)
    path.chmod(0o755)
    return path


@needs_cc
def test_helper_is_a_static_x86_64_elf(helper):
    data = helper.read_bytes()
    assert rootfs.is_static_elf(data)
    assert len(data) < 2 << 20


@needs_cc
@pytest.mark.parametrize("argv", [[], ["-l"], ["-l", "52"], ["-c", "2"], ["-c", "2", "x"], ["-l", "-1", "/bin/true"],
                                  ["-l", "4294967296", "/bin/true"], ["-x", "1", "2"]])
def test_helper_rejects_bad_arguments(helper, argv):
    proc = subprocess.run([str(helper), *argv], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "usage" in proc.stderr


@needs_cc
def test_helper_reports_a_failed_connect(helper):
    # CID 0x7fffffff is nobody: with or without a host vsock transport the connect fails.
    proc = subprocess.run([str(helper), "-c", "2147483647", "52"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=10)
    assert proc.returncode == 1 and "ember-vsock: connect" in proc.stderr


def test_compile_error_is_an_ember_error(tmp_path, monkeypatch):
    monkeypatch.setattr(rootfs, "_package_file", lambda name: b"int main( {")
    if MISSING:
        pytest.skip(f"host C toolchain missing: {MISSING}")
    with pytest.raises(EmberError, match="cannot compile the guest vsock helper"):
        rootfs.compile_vsock_helper(tmp_path)


def test_missing_compiler_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "find_tool", lambda tool: None)
    with pytest.raises(EmberError, match="apt-get install gcc"):
        rootfs.compile_vsock_helper(tmp_path)


def test_cache_key_follows_the_helper_source(monkeypatch):
    before = rootfs.rootfs_key()
    real = rootfs._package_file
    def changed(name: str) -> bytes:
        return real(name) + (b"\n/* changed */\n" if name == rootfs.VSOCK_HELPER_SOURCE else b"")

    monkeypatch.setattr(rootfs, "_package_file", changed)
    assert rootfs.rootfs_key() != before


@needs_cc
@pytest.mark.skipif(not rootfs.BUSYBOX.exists(), reason="busybox-static is not installed")
def test_rootfs_holds_the_helper(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = rootfs.build_rootfs(progress=False)
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.skip("cpio is not installed (apt-get install cpio)")
    listing = subprocess.run([cpio, "-tv", "--quiet"], input=gzip.decompress(built["initrd"].read_bytes()),
                             capture_output=True, check=True).stdout.decode()
    line = next(entry for entry in listing.splitlines() if entry.endswith(" " + rootfs.VSOCK_HELPER_PATH))
    assert line.startswith("-rwxr-xr-x")
    debugfs = tools.find_tool("debugfs")
    if debugfs:
        stat = subprocess.run([debugfs, "-R", f"stat /{rootfs.VSOCK_HELPER_PATH}", str(built["rootfs"])],
                              capture_output=True, text=True).stdout
        assert "Mode:  0755" in stat


def run_init(tmp_path: Path, cmdline: str, body: str) -> str:
    """Source init with a fake cmdline, run ``body``; returns its stdout."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    script = f'. "{INIT}"\nEMBER_CMDLINE="{tmp_path}/cmdline"\nEMBER_CONSOLE=/dev/null\n{body}\n'
    proc = subprocess.run([BUSYBOX, "sh", "-c", script], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fake_virtio_bus(tmp_path: Path, device_ids: list[str]) -> Path:
    bus = tmp_path / "virtio"
    for i, dev_id in enumerate(device_ids):
        (bus / f"virtio{i}").mkdir(parents=True)
        (bus / f"virtio{i}" / "device").write_text(dev_id + "\n")
    bus.mkdir(exist_ok=True)
    return bus


@needs_busybox
@pytest.mark.parametrize("ids, present", [([], False), (["0x0002", "0x0004"], False), (["0x0002", "0x0013"], True)])
def test_init_finds_the_vsock_device(tmp_path, ids, present):
    bus = fake_virtio_bus(tmp_path, ids)
    out = run_init(tmp_path, "console=ttyS0", f'ember_has_vsock "{bus}" && echo yes || echo no')
    assert out.strip() == ("yes" if present else "no")


@needs_busybox
@pytest.mark.parametrize("cmdline, expected", [("console=ttyS0", "-l 52 /sbin/ember-agent -"),
                                               ("ember.vsock_agent=1234", "-l 1234 /sbin/ember-agent -"),
                                               ("ember.vsock_agent=0", "")])
def test_init_starts_the_vsock_agent(tmp_path, cmdline, expected):
    bus = fake_virtio_bus(tmp_path, ["0x0013"])
    fake = tmp_path / "helper"
    fake.write_text(f'#!{BUSYBOX} sh\necho "$@" >"{tmp_path}/started"\n')
    fake.chmod(0o755)
    body = (f'EMBER_VIRTIO_DEVICES="{bus}"; EMBER_VSOCK_HELPER="{fake}"; ember_start_agents; wait; '
            f'cat "{tmp_path}/started" 2>/dev/null; true')
    assert run_init(tmp_path, cmdline, body).strip() == expected


@needs_busybox
def test_init_skips_the_vsock_agent_without_a_device(tmp_path):
    bus = fake_virtio_bus(tmp_path, ["0x0002"])
    fake = tmp_path / "helper"
    fake.write_text(f'#!{BUSYBOX} sh\necho started >"{tmp_path}/started"\n')
    fake.chmod(0o755)
    run_init(tmp_path, "", f'EMBER_VIRTIO_DEVICES="{bus}"; EMBER_VSOCK_HELPER="{fake}"; ember_start_agents; wait')
    assert not (tmp_path / "started").exists()


@needs_busybox
def test_agent_serves_its_stdio_with_dash(tmp_path):
    proc = subprocess.run([BUSYBOX, "sh", str(AGENT), "-"], input=b"EXEC 4 ZWNobyBoaQ==\n",
                          capture_output=True, timeout=20)
    assert proc.stdout.splitlines() == [b"READY 0 1", b"OUT 4 aGkK", b"ERR 4 ", b"RC 4 0"]
