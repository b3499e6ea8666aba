"""The rig's L1 kernel: Debian's generic linux-image, unpacked into Ember's cache.

Resolves ``linux-image-amd64`` to its versioned package (apt-cache depends),
downloads the .deb (apt-get download), unpacks it with ``dpkg-deb -x`` (never
installs it), runs ``depmod -b`` for modules.dep, and extracts the ELF vmlinux
from the bzImage so QEMU can boot it through the PVH entry (no decompressor).
"""

from __future__ import annotations

import logging
import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.images.cache import cache_dir, locked, remove_stale_builds, staging

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-amd64"
PACKAGE_RE = re.compile(r"Depends:\s*(linux-image-\d[\w.+-]*-amd64(?:-unsigned)?)\s*$", re.M)
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
VMLINUX_NAME = "vmlinux"
DONE_NAME = "package"


@dataclass(frozen=True)
class RigKernel:
    """An unpacked kernel package: where its vmlinux and modules live."""

    package: str
    version: str
    release: str
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / VMLINUX_NAME

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.release}"


def rig_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ember/rig."""
    return cache_dir() / "rig"


def _tool(argv: list[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise EmberError(f"the rig needs '{argv[0]}' to {what}; it is not installed")
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise EmberError(f"cannot {what}: '{' '.join(argv)}' failed: {detail[0]}") from exc
    return done.stdout


def parse_depends(text: str) -> str:
    """The versioned image package named by `apt-cache depends linux-image-amd64`."""
    match = PACKAGE_RE.search(text)
    if match is None:
        raise EmberError(f"apt-cache depends {META_PACKAGE} names no linux-image package")
    return match.group(1)


def release_of(package: str) -> str:
    """'linux-image-6.1.0-56-amd64-unsigned' -> '6.1.0-56-amd64' (the uname -r)."""
    return package.removeprefix("linux-image-").removesuffix("-unsigned")


def package_version(package: str) -> str:
    """The candidate version apt would download."""
    out = _tool(["apt-cache", "policy", package], f"find the version of {package}")
    match = re.search(r"Candidate:\s*(\S+)", out)
    if match is None or match.group(1) == "(none)":
        raise EmberError(f"apt has no candidate for {package}: run apt-get update")
    return match.group(1)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside an xz-compressed bzImage (Debian's CONFIG_KERNEL_XZ)."""
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise EmberError("the kernel image holds no xz payload (not CONFIG_KERNEL_XZ?)")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = decompressor.decompress(bzimage[start:])
    if not elf.startswith(ELF_MAGIC):
        raise EmberError("the kernel image's xz payload is not an ELF vmlinux")
    return elf


def _unpack(package: str, release: str, out: Path) -> None:
    """Download and unpack ``package`` into ``out``; add modules.dep and vmlinux."""
    download = out / "deb"
    download.mkdir()
    _tool(["apt-get", "download", package], f"download {package}", cwd=download)
    debs = list(download.glob("*.deb"))
    if len(debs) != 1:
        raise EmberError(f"apt-get download {package} left {len(debs)} .deb files")
    _tool(["dpkg-deb", "-x", str(debs[0]), str(out)], f"unpack {debs[0].name}")
    shutil.rmtree(download)
    _tool(["depmod", "-b", str(out), release], "index the kernel modules")
    bzimage = (out / "boot" / f"vmlinuz-{release}").read_bytes()
    (out / VMLINUX_NAME).write_bytes(extract_vmlinux(bzimage))
    (out / DONE_NAME).write_text(f"{package} {package_version(package)}\n")


def rig_kernel() -> RigKernel:
    """The unpacked kernel package, downloading it into the cache on first use."""
    package = parse_depends(_tool(["apt-cache", "depends", META_PACKAGE], "find Debian's kernel package"))
    version = package_version(package)
    release = release_of(package)
    kind_dir = rig_cache_dir() / "kernel"
    final = kind_dir / f"{package}_{version}"
    if not (final / DONE_NAME).exists():
        with locked(kind_dir):
            remove_stale_builds(kind_dir)
            if not (final / DONE_NAME).exists():
                log.info("fetching %s %s for the rig", package, version)
                with staging(final) as out:
                    _unpack(package, release, out)
    return RigKernel(package, version, release, final)
