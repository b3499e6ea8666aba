"""Ember's default guest images: a microVM Linux kernel and a BusyBox root file system.

Built from Debian packages only (linux-source-6.1, busybox-static) into the
user's cache dir, keyed by package version and recipe hash; see kernel.py and
rootfs.py. This module is the public API used by the CLI and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ember.errors import EmberError
from ember.images.cache import cache_dir
from ember.images.kernel import build_kernel, cached_kernel
from ember.images.rootfs import build_rootfs, cached_rootfs

ArtifactName = Literal["kernel", "vmlinux", "initrd", "rootfs"]
KERNEL_ARTIFACTS = ("kernel", "vmlinux")
ROOTFS_ARTIFACTS = ("initrd", "rootfs")
ARTIFACT_NAMES = KERNEL_ARTIFACTS + ROOTFS_ARTIFACTS

__all__ = ["ARTIFACT_NAMES", "artifact_path", "build_all", "build_kernel", "build_rootfs", "cache_dir"]


def build_all(progress: bool = True) -> dict[str, Path]:
    """Build (or reuse) everything: {'kernel', 'vmlinux', 'config', 'initrd', 'rootfs'}."""
    return {**build_rootfs(progress=progress), **build_kernel(progress=progress)}


def artifact_path(name: ArtifactName, build: bool = True, progress: bool = True) -> Path:
    """Path of one artifact ('kernel' is the bzImage); builds it unless ``build`` is False."""
    if name not in ARTIFACT_NAMES:
        raise EmberError(f"unknown image '{name}': choose one of {', '.join(ARTIFACT_NAMES)}")
    is_kernel = name in KERNEL_ARTIFACTS
    found = cached_kernel() if is_kernel else cached_rootfs()
    if found is None and build:
        found = build_kernel(progress=progress) if is_kernel else build_rootfs(progress=progress)
    if found is None:
        raise EmberError(f"image '{name}' is not built yet: run 'ember images build'")
    return found[name]
