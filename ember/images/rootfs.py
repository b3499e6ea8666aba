"""Builds Ember's default BusyBox root file system: a gzip initramfs and an ext4 image.

Both hold the same tree (busybox-static and its applet links, Ember's init and
guest agent, the ember-vsock helper compiled here from vsock_helper.c with the
host gcc, a minimal /etc). The initramfs follows the kernel's
early-userspace buffer format (see cpio.py); the ext4 image is made without
root or loop devices by ``mkfs.ext4 -d`` (e2fsprogs) from a staging dir.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import subprocess
from importlib import resources
from pathlib import Path

from ember.errors import EmberError
from ember.images import cache
from ember.images.cpio import CpioArchive, CpioEntry
from ember.images.progress import BuildProgress
from ember.images.tools import HELPER_TOOLS, ROOTFS_TOOLS, require_tools

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"
ROOTFS_KIND = "rootfs"
INITRD_NAME = "initrd.cpio.gz"
EXT4_NAME = "rootfs.ext4"
EXT4_SIZE = "64M"
EXT4_LABEL = "ember-root"
RECIPE_VERSION = b"ember-rootfs-recipe-2"
VSOCK_HELPER_SOURCE = "vsock_helper.c"
VSOCK_HELPER_PATH = "sbin/ember-vsock"
HELPER_CFLAGS = ("-static", "-Os", "-s", "-Wall")
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1
SKIPPED_APPLETS = {"linuxrc", "sbin/init", "init"}  # /sbin/init is Ember's init
DIRS = {"bin": 0o755, "sbin": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
        "dev": 0o755, "proc": 0o555, "sys": 0o555, "tmp": 0o1777, "root": 0o700,
        "mnt": 0o755, "run": 0o755, "var": 0o755}
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hostname": "ember\n",
    "etc/profile": "export PATH=/sbin:/bin:/usr/sbin:/usr/bin\nexport PS1='\\h:\\w\\$ '\n",
}
ELF_MAGIC = b"\x7fELF"
ELF64_CLASS = 2
ELF64_HEADER_SIZE = 64
PT_INTERP = 3


def _package_file(name: str) -> bytes:
    return resources.files("ember.images").joinpath(name).read_bytes()


def is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF with no PT_INTERP (no dynamic loader)."""
    if len(data) < ELF64_HEADER_SIZE or data[:4] != ELF_MAGIC or data[4] != ELF64_CLASS:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if phentsize < 4 or off + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, off)[0] == PT_INTERP:
            return False
    return True


def busybox_binary(path: Path = BUSYBOX) -> bytes:
    """The static busybox binary, or an EmberError naming busybox-static."""
    if not path.is_file():
        raise EmberError(f"{path} is missing: install it with 'apt-get install {BUSYBOX_PACKAGE}'")
    data = path.read_bytes()
    if not is_static_elf(data):
        raise EmberError(f"{path} is not a static x86-64 binary: install '{BUSYBOX_PACKAGE}'")
    return data


def busybox_applets(path: Path = BUSYBOX) -> list[str]:
    """Applet install paths (e.g. 'bin/sh', 'usr/bin/awk') from ``busybox --list-full``."""
    out = subprocess.run([str(path), "--list-full"], capture_output=True, text=True, check=True)
    return [a.strip("/") for a in out.stdout.split() if a.strip("/") not in SKIPPED_APPLETS]


def compile_vsock_helper(scratch: Path) -> bytes:
    """Build ember-vsock (AF_VSOCK listen/connect helper) as a static binary with the host gcc."""
    gcc = require_tools(HELPER_TOOLS)["gcc"]
    source = scratch / VSOCK_HELPER_SOURCE
    source.write_bytes(_package_file(VSOCK_HELPER_SOURCE))
    binary = scratch / "ember-vsock"
    done = subprocess.run([gcc, *HELPER_CFLAGS, "-o", str(binary), str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        raise EmberError(f"cannot compile the guest vsock helper: {done.stderr.strip()[-500:]}")
    data = binary.read_bytes()
    if not is_static_elf(data):
        raise EmberError("the guest vsock helper did not link statically: install 'libc6-dev'")
    return data


def rootfs_tree(busybox: Path = BUSYBOX, vsock_helper: bytes | None = None) -> CpioArchive:
    """The whole guest tree as an archive (the single description of the rootfs)."""
    arc = CpioArchive()
    for path, mode in DIRS.items():
        arc.add_dir(path, mode)
    arc.add_char_device("dev/console", CONSOLE_MAJOR, CONSOLE_MINOR)
    arc.add_file("bin/busybox", busybox_binary(busybox), 0o755)
    for applet in busybox_applets(busybox):
        if applet not in arc:
            arc.add_symlink(applet, "/bin/busybox")
    arc.add_file("init", _package_file("init"), 0o755)
    arc.add_symlink("sbin/init", "/init")
    arc.add_file("sbin/ember-agent", _package_file("agent.sh"), 0o755)
    if vsock_helper is not None:
        arc.add_file(VSOCK_HELPER_PATH, vsock_helper, 0o755)
    for path, text in ETC_FILES.items():
        arc.add_file(path, text.encode(), 0o644)
    return arc


def materialize(entries: list[CpioEntry], root: Path) -> None:
    """Write entries into a staging dir; device nodes are skipped (devtmpfs makes them)."""
    for entry in entries:
        path = root / entry.name
        kind = stat.S_IFMT(entry.mode)
        if kind == stat.S_IFDIR:
            path.mkdir(parents=True, exist_ok=True)
        elif kind == stat.S_IFREG:
            path.write_bytes(entry.data)
        elif kind == stat.S_IFLNK:
            os.symlink(entry.data.decode(), path)
            continue
        else:
            continue
        os.chmod(path, stat.S_IMODE(entry.mode))


def _chown_root_commands(entries: list[CpioEntry]) -> str:
    """debugfs commands giving every inode uid/gid 0 (for builds run as non-root)."""
    lines = []
    for entry in entries:
        if stat.S_ISCHR(entry.mode):
            continue
        lines += [f'sif "/{entry.name}" uid 0', f'sif "/{entry.name}" gid 0']
    return "\n".join(lines) + "\n"


def make_ext4(entries: list[CpioEntry], image: Path, scratch: Path) -> None:
    """Create ``image`` (ext4, EXT4_SIZE) holding ``entries``, all owned by root."""
    tools = require_tools(ROOTFS_TOOLS)
    staging = scratch / "tree"
    staging.mkdir()
    materialize(entries, staging)
    subprocess.run([tools["mkfs.ext4"], "-q", "-F", "-L", EXT4_LABEL, "-E", "root_owner=0:0",
                    "-d", str(staging), str(image), EXT4_SIZE], check=True, capture_output=True)
    if os.geteuid() != 0:
        script = scratch / "chown.debugfs"
        script.write_text(_chown_root_commands(entries))
        subprocess.run([tools["debugfs"], "-w", "-f", str(script), str(image)], check=True, capture_output=True)


def rootfs_key(busybox: Path = BUSYBOX) -> str:
    """Cache key: busybox version + hash of init, agent, vsock helper source, recipe and image size."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", BUSYBOX_PACKAGE],
                             capture_output=True, text=True, check=True)
        version = out.stdout.strip().replace(":", "_") or "unknown"
    except (OSError, subprocess.CalledProcessError):
        version = "unknown"
    st = busybox.stat() if busybox.exists() else None
    bb_id = b"%d:%d" % (st.st_size, st.st_mtime_ns) if st else b"missing"
    digest = cache.short_hash(_package_file("init"), _package_file("agent.sh"), _package_file(VSOCK_HELPER_SOURCE),
                              RECIPE_VERSION, " ".join(HELPER_CFLAGS).encode(), EXT4_SIZE.encode(), bb_id)
    return f"busybox-{version}-{digest}"


def rootfs_dir(busybox: Path = BUSYBOX) -> Path:
    return cache.cache_dir() / ROOTFS_KIND / rootfs_key(busybox)


def cached_rootfs(busybox: Path = BUSYBOX) -> dict[str, Path] | None:
    final = rootfs_dir(busybox)
    paths = {"initrd": final / INITRD_NAME, "rootfs": final / EXT4_NAME}
    return paths if all(p.is_file() for p in paths.values()) else None


def build_rootfs(progress: bool = True, busybox: Path = BUSYBOX) -> dict[str, Path]:
    """Build (or reuse from the cache) the initramfs and the ext4 root image.

    Returns {'initrd': initrd.cpio.gz, 'rootfs': rootfs.ext4}.
    """
    found = cached_rootfs(busybox)
    if found:
        return found
    final = rootfs_dir(busybox)
    cache.refuse_build_in_rig(final)
    with cache.locked(final.parent):
        found = cached_rootfs(busybox)
        if found:
            return found
        cache.remove_stale_builds(final.parent)
        with BuildProgress(f"rootfs {final.name}", enabled=progress, unit="files") as bar, \
                cache.staging(final) as out:
            bar.step("compiling the vsock helper")
            helper = compile_vsock_helper(out.parent)
            bar.step("collecting busybox, init and agent")
            tree = rootfs_tree(busybox, helper)
            bar.advance(len(tree))
            bar.step("writing initramfs")
            (out / INITRD_NAME).write_bytes(tree.to_gzip())
            bar.step("writing ext4 image")
            make_ext4(tree.entries(), out / EXT4_NAME, out.parent)
    found = cached_rootfs(busybox)
    assert found is not None
    return found
