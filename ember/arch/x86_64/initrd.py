"""Initial ramdisk placement in guest RAM.

Linux boot protocol (Documentation/arch/x86/boot.rst, "initrd_addr_max" and
"ramdisk_image"): the initrd goes page-aligned as high as possible below
initrd_addr_max and the top of low RAM, above the kernel.
"""

from __future__ import annotations

import logging
import os

from ember.errors import EmberError

from . import layout
from .kernel import LoadedKernel

log = logging.getLogger(__name__)


class InitrdError(EmberError):
    """The initrd cannot be loaded; the message names why."""


def place_initrd(kernel: LoadedKernel, size: int, mem_size: int) -> int:
    """The gpa for an initrd of ``size`` bytes, or InitrdError if it doesn't fit."""
    top = min(kernel.initrd_addr_max + 1, layout.low_ram_end(mem_size))
    gpa = layout.align_down(top - size, layout.PAGE_SIZE)
    if gpa < layout.align_up(kernel.load_end, layout.PAGE_SIZE):
        need = -(-(layout.align_up(kernel.load_end, layout.PAGE_SIZE) + size) // layout.MiB)
        raise InitrdError(f"not enough guest memory for kernel and initrd (need {need} MiB)")
    return gpa


def load_initrd(memory, path: str | os.PathLike, kernel: LoadedKernel,
                mem_size: int) -> tuple[int, int]:
    """Copy the initrd at ``path`` into guest memory; returns (gpa, size)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InitrdError(f"initrd {path} does not exist") from None
    except OSError as e:
        raise InitrdError(f"cannot open initrd {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise InitrdError(f"initrd {path} is empty")
        gpa = place_initrd(kernel, size, mem_size)
        _copy(fd, memory.view(gpa, size), path)
    finally:
        os.close(fd)
    log.info("loaded initrd %s at %#x (%d bytes)", path, gpa, size)
    return gpa, size


def _copy(fd: int, view: memoryview, path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], done)
        if n <= 0:
            raise InitrdError(f"initrd {path} shrank while it was being read")
        done += n
