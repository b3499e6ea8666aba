"""The BusyBox root file system: initramfs and ext4 contents, cache and failure behaviour."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from ember.errors import EmberError
from ember.images import artifact_path, build_rootfs, cache_dir, rootfs
from ember.images.tools import require_tools

NEEDED = {"cpio": "cpio", "e2fsck": "e2fsprogs", "debugfs": "e2fsprogs", "mkfs.ext4": "e2fsprogs"}
MISSING = [t for t in NEEDED if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"host tools missing: {MISSING} (apt-get install cpio e2fsprogs)"),
    pytest.mark.skipif(not rootfs.BUSYBOX.exists(), reason="busybox-static is not installed"),
]
INIT_BYTES = resources.files("ember.images").joinpath("init").read_bytes()


def tool(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def built(fresh_cache):
    return build_rootfs(progress=False)


def test_cache_location(fresh_cache, monkeypatch):
    assert cache_dir() == fresh_cache / "ember"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "ember"


def test_initramfs_holds_init_busybox_and_console(built):
    listing = subprocess.run([tool("cpio"), "-tv", "--quiet"], input=gzip.decompress(built["initrd"].read_bytes()),
                             capture_output=True, check=True).stdout.decode().splitlines()
    names = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing}
    for path in ("init", "bin/busybox", "bin/sh", "sbin/init", "sbin/ember-agent", "etc/passwd",
                 "etc/hostname", "proc", "sys", "tmp", "root", "mnt", "dev/console"):
        assert path in names, path
    assert names["dev/console"].startswith("crw")
    assert names["init"].startswith("-rwxr-xr-x")
    assert names["sbin/init"].endswith("-> /init")
    assert names["bin/sh"].endswith("-> /bin/busybox")
    assert " root " in names["bin/busybox"] or " 0 " in names["bin/busybox"]


def test_ext4_image_is_clean_and_holds_the_tree(built):
    image = str(built["rootfs"])
    fsck = subprocess.run([tool("e2fsck"), "-fn", image], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    ls_bin = subprocess.run([tool("debugfs"), "-R", "ls -l /bin", image], capture_output=True, text=True).stdout
    assert " busybox" in ls_bin and " sh" in ls_bin
    init = subprocess.run([tool("debugfs"), "-R", "cat /init", image], capture_output=True).stdout
    assert init == INIT_BYTES
    stat_init = subprocess.run([tool("debugfs"), "-R", "stat /bin/busybox", image],
                               capture_output=True, text=True).stdout
    assert "User:     0   Group:     0" in stat_init
    hostname = subprocess.run([tool("debugfs"), "-R", "cat /etc/hostname", image], capture_output=True).stdout
    assert hostname == b"ember\n"


def test_second_build_is_a_cache_hit(built):
    mtime = built["initrd"].stat().st_mtime_ns
    again = build_rootfs(progress=False)
    assert again == built and again["initrd"].stat().st_mtime_ns == mtime
    assert artifact_path("initrd", build=False) == built["initrd"]


def test_interrupted_build_leaves_nothing(fresh_cache, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(rootfs, "make_ext4", boom)
    with pytest.raises(KeyboardInterrupt):
        build_rootfs(progress=False)
    kind_dir = fresh_cache / "ember" / "rootfs"
    assert [p.name for p in kind_dir.iterdir()] == [".lock"]
    with pytest.raises(EmberError, match="not built"):
        artifact_path("rootfs", build=False)


def test_non_root_build_still_owns_files_as_root(fresh_cache, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    image = build_rootfs(progress=False)["rootfs"]
    out = subprocess.run([tool("debugfs"), "-R", "stat /sbin/init", str(image)], capture_output=True, text=True).stdout
    assert "User:     0   Group:     0" in out


def test_missing_busybox_names_the_package(tmp_path):
    with pytest.raises(EmberError, match="busybox-static"):
        rootfs.busybox_binary(tmp_path / "busybox")


def test_dynamic_busybox_is_refused(tmp_path):
    fake = tmp_path / "busybox"
    shutil.copy(shutil.which("ls") or "/bin/ls", fake)
    with pytest.raises(EmberError, match="busybox-static"):
        rootfs.busybox_binary(fake)
    assert rootfs.is_static_elf(rootfs.BUSYBOX.read_bytes())
    assert not rootfs.is_static_elf(b"\x7fELF\x02")  # truncated
    assert not rootfs.is_static_elf(b"#!/bin/sh\n" + bytes(100))


def test_missing_tool_names_the_package():
    with pytest.raises(EmberError, match="apt-get install some-package"):
        require_tools({"ember-no-such-tool": "some-package"})


def test_unknown_artifact_name():
    with pytest.raises(EmberError, match="unknown image"):
        artifact_path("floppy", build=False)  # type: ignore[arg-type]


def test_interactive_progress_build(fresh_cache, capsys):
    paths = build_rootfs(progress=True)
    assert paths["rootfs"].is_file()
    assert "rootfs" in capsys.readouterr().err
