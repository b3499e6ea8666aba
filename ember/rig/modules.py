"""Kernel module selection for the rig's initramfs.

Reads depmod's ``modules.dep`` format (kmod's modules.dep(5): "path: dep dep ...")
and ``modules.builtin``, and orders the modules the rig needs so that every
module comes after the modules it depends on (what ``modprobe`` would load).
"""

from __future__ import annotations

import gzip
import lzma
from pathlib import PurePosixPath

from ember.errors import EmberError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
ELF_MAGIC = b"\x7fELF"


def module_name(path: str) -> str:
    """'kernel/arch/x86/kvm/kvm-amd.ko.xz' -> 'kvm_amd' (kmod treats '-' as '_')."""
    base = PurePosixPath(path).name
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (relative path, paths of its dependencies)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep:
            raise EmberError(f"modules.dep line {lineno} has no ':': {line!r}")
        table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def parse_builtin(text: str) -> set[str]:
    """Names of the modules compiled into the kernel (modules.builtin)."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(wanted: list[str], dep: dict[str, tuple[str, list[str]]], builtin: set[str]) -> list[str]:
    """Relative paths of ``wanted`` modules and their dependencies, dependencies first.

    Built-in modules are skipped; a module that is neither loadable nor built in
    is an error naming it.
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise EmberError(f"kernel module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in dep:
            if name in builtin:
                return
            raise EmberError(f"kernel module '{name}' is neither in modules.dep nor built in")
        path, deps = dep[name]
        for dep_path in deps:
            visit(module_name(dep_path), chain + (name,))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def decompress_module(data: bytes) -> bytes:
    """A module's ELF bytes, whether stored plain, xz, zstd or gzip compressed."""
    if data.startswith(ELF_MAGIC):
        return data
    if data.startswith(XZ_MAGIC):
        return lzma.decompress(data)
    if data.startswith(GZIP_MAGIC):
        return gzip.decompress(data)
    if data.startswith(ZSTD_MAGIC):
        return _zstd_decompress(data)
    raise EmberError("kernel module is neither ELF nor xz/zstd/gzip compressed")


def _zstd_decompress(data: bytes) -> bytes:
    """zstd has no stdlib module before 3.14: use the zstd tool."""
    import subprocess

    try:
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EmberError(f"cannot decompress a .ko.zst module (is zstd installed?): {exc}") from exc


__all__ = ["decompress_module", "load_order", "module_name", "parse_builtin", "parse_modules_dep"]
