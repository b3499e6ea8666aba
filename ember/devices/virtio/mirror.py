"""A guest-readable copy of one virtio-mmio register window (VIRTIO 1.2 section 4.2.2).

The machine maps this page over the transport's window as read-only guest
memory (KVM_MEM_READONLY, KVM API 4.35): the guest's loads from the window,
InterruptStatus above all, are served from it without a VM exit, while its
stores still exit (or reach an ioeventfd or the coalesced ring). The transport
keeps every readable register here current. Words are stored whole, so the
guest never sees half of one.
"""

from __future__ import annotations

import ctypes
import mmap

from ember.kvm.structs import PAGE_SIZE

WORD = 4
_U32_MASK = 0xFFFFFFFF


class RegisterMirror:
    """One page of register values, little-endian as the guest reads them (x86 is)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._words = memoryview(self._page).cast("I")
        self._anchor = ctypes.c_char.from_buffer(self._page)

    @property
    def host_address(self) -> int:
        """Where the page is in this process (for KVM_SET_USER_MEMORY_REGION)."""
        return ctypes.addressof(self._anchor)

    @property
    def size(self) -> int:
        return PAGE_SIZE

    def set_word(self, offset: int, value: int) -> None:
        """Publish one 32-bit register at a 4-byte aligned ``offset``, in one store."""
        self._words[offset // WORD] = value & _U32_MASK

    @property
    def closed(self) -> bool:
        return self._page.closed

    def word(self, offset: int) -> int:
        return self._words[offset // WORD]

    def set_bytes(self, offset: int, data: bytes) -> None:
        """Publish ``data`` at ``offset`` and zeros from its end to the page's end."""
        end = offset + len(data)
        self._page[offset:end] = data
        self._page[end:] = bytes(PAGE_SIZE - end)

    def read(self, offset: int, size: int) -> bytes:
        """What a guest load of ``size`` bytes at ``offset`` sees."""
        return self._page[offset:offset + size]

    def close(self) -> None:
        self._anchor = None
        self._words.release()
        try:
            self._page.close()
        except BufferError:  # a view is still alive; the page goes with it
            pass
