"""The rig: a small emulated host with AMD-V (QEMU TCG) for hosts without hardware KVM.

``run(argv)`` boots Debian's generic kernel under QEMU with nested SVM, mounts
the host's root read-only (9p + tmpfs overlay), runs one command in the
caller's working directory with /dev/kvm available, and returns its status.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from ember.errors import EmberError
from ember.rig.command import command_script, init_settings, rig_environment, snapshot_table
from ember.rig.qemu import QEMU, TIMEOUT_STATUS, ProgressWatch, RigRun, boot, make_run_dir

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1800.0
DEFAULT_MEMORY_MIB = 4096
DEFAULT_CPUS = 2
KEEP_ENV = "EMBER_RIG_KEEP"
REQUIRED_TOOLS = {QEMU: "qemu-system-x86", "apt-cache": "apt", "apt-get": "apt",
                  "dpkg-deb": "dpkg", "depmod": "kmod"}

__all__ = ["DEFAULT_TIMEOUT", "TIMEOUT_STATUS", "ProgressWatch", "is_available", "require_available", "run"]


def require_available() -> None:
    """Raise an EmberError naming what the rig lacks on this host."""
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None:
            raise EmberError(f"the rig needs '{tool}' (apt-get install {package})")
    if not Path("/bin/busybox").exists():
        raise EmberError("the rig needs /bin/busybox (apt-get install busybox-static)")


def is_available() -> bool:
    """True when this host has what the rig needs (the kernel is fetched on demand)."""
    try:
        require_available()
    except EmberError:
        return False
    return True


def _prepare() -> tuple[Path, Path]:
    from ember.rig.initramfs import rig_initramfs
    from ember.rig.kernel import rig_kernel

    kernel = rig_kernel()
    return kernel.vmlinux, rig_initramfs(kernel)


def run(argv: list[str], *, cwd: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT,
        out_dir: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
        memory_mib: int = DEFAULT_MEMORY_MIB, cpus: int = DEFAULT_CPUS, watch: ProgressWatch | None = None) -> int:
    """Run ``argv`` inside the rig and return its exit status (124: timed out, or stalled per ``watch``).

    Output streams to sys.stdout/sys.stderr as it comes. ``env`` adds to the
    passed-through subset of os.environ. Files the command writes under
    ``out_dir`` (created if missing) come back to the host; all else is discarded.
    """
    require_available()
    vmlinux, initrd = _prepare()
    work_dir = os.path.abspath(cwd if cwd is not None else os.getcwd())
    out = Path(out_dir).resolve() if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    from ember.rig.trees import snapshots

    rig = RigRun(vmlinux, initrd, make_run_dir(), out, memory_mib, cpus, snapshots=snapshots())
    # One VM held open for the rig's life keeps KVM's static keys from flipping (kvm_keeper.py).
    keeper = [sys.executable, "-m", "ember.rig.kvm_keeper"]
    script = command_script(list(argv), work_dir, rig_environment(os.environ, env), background=keeper)
    (rig.ctl_dir / "command.sh").write_text(script)
    (rig.ctl_dir / "rig.env").write_text(init_settings(str(out) if out else None))
    (rig.ctl_dir / "trees").write_text(snapshot_table([str(tree) for tree, _image in rig.snapshots]))
    try:
        status = boot(rig, timeout, sys.stdout, sys.stderr, watch)
    except EmberError:
        log.error("rig files kept in %s", rig.run_dir)
        raise
    if os.environ.get(KEEP_ENV):
        log.warning("rig files kept in %s (%s is set)", rig.run_dir, KEEP_ENV)
    else:
        shutil.rmtree(rig.run_dir, ignore_errors=True)
    return status
