"""The rig's initramfs: BusyBox, the kernel modules the rig needs, and its /init.

Built with Ember's newc cpio writer (kernel early-userspace buffer format) and
cached next to the kernel, keyed by the kernel package, the module list, the
init script and the BusyBox binary, so an unchanged rig is never rebuilt.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from ember.errors import EmberError
from ember.images.cache import locked, remove_stale_builds, short_hash, staging
from ember.images.cpio import CpioArchive
from ember.rig.kernel import RigKernel, rig_cache_dir
from ember.rig.modules import decompress_module, load_order, parse_builtin, parse_modules_dep

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
INIT_RESOURCE = "init"
# What the rig's L1 needs: KVM on AMD-V, virtio-mmio transport, 9p root and
# control shares, virtio-serial ports for the command's output, an overlay
# root, ext4 on virtio-blk for the Python snapshots, and TUN for L2 guests' networking.
RIG_MODULES = ["virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "overlay", "virtio_blk", "crc32c_generic",
               "ext4", "kvm_amd", "tun"]
MODULE_DIR = "lib/modules"
LOAD_LIST = "lib/modules/load.list"
EXEC_MODE = 0o755
INITRD_NAME = "rig.cpio"


def init_script() -> bytes:
    """The rig's /init (a BusyBox sh script shipped as package data)."""
    return resources.files("ember.rig").joinpath(INIT_RESOURCE).read_bytes()


def module_paths(kernel: RigKernel, wanted: list[str] = RIG_MODULES) -> list[str]:
    """Relative paths of the modules to load, dependencies first."""
    dep = parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin = parse_builtin((kernel.modules_dir / "modules.builtin").read_text())
    return load_order(wanted, dep, builtin)


def build_archive(kernel: RigKernel, busybox: bytes, init: bytes) -> CpioArchive:
    """The initramfs tree: /bin/busybox, /init, the modules and their load list."""
    archive = CpioArchive()
    for directory in ("dev", "proc", "sys", "tmp", "ctl", "lower", "rw", "newroot"):
        archive.add_dir(directory)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_char_device("dev/null", 1, 3, mode=0o666)
    archive.add_file("bin/busybox", busybox, mode=EXEC_MODE)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file("init", init, mode=EXEC_MODE)
    names = []
    for rel in module_paths(kernel):
        name = Path(rel).name.split(".ko")[0] + ".ko"
        data = decompress_module((kernel.modules_dir / rel).read_bytes())
        archive.add_file(f"{MODULE_DIR}/{name}", data)
        names.append(name)
    archive.add_file(LOAD_LIST, ("\n".join(names) + "\n").encode())
    return archive


def rig_initramfs(kernel: RigKernel) -> Path:
    """The cached initramfs for ``kernel``, built on first use."""
    if not BUSYBOX.exists():
        raise EmberError(f"the rig needs {BUSYBOX} (apt-get install busybox-static)")
    busybox = BUSYBOX.read_bytes()
    init = init_script()
    key = short_hash(kernel.package.encode(), kernel.version.encode(), init, busybox,
                     " ".join(RIG_MODULES).encode())
    kind_dir = rig_cache_dir() / "initramfs"
    final = kind_dir / key
    if not (final / INITRD_NAME).exists():
        with locked(kind_dir):
            remove_stale_builds(kind_dir)
            if not (final / INITRD_NAME).exists():
                with staging(final) as out:
                    (out / INITRD_NAME).write_bytes(build_archive(kernel, busybox, init).to_bytes())
    return final / INITRD_NAME
