"""ELF vmlinux and bzImage loading (Linux boot protocol, boot.rst) into real GuestMemory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.arch.x86_64 import layout
from ember.arch.x86_64.kernel import KernelImageError, load_kernel
from ember.errors import EmberError
from ember.memory import GuestMemory

from test_arch_images import (BZ_ALIGNMENT, BZ_CMDLINE_SIZE, BZ_INIT_SIZE, BZ_INITRD_ADDR_MAX,
                              BZ_PAYLOAD, BZ_PREF_ADDRESS, ELF_BSS, ELF_LOAD_ADDR, ELF_PAYLOAD,
                              bzimage, elf_image)

MEM_SIZE = 64 * layout.MiB


@pytest.fixture(scope="module")
def memory():
    with GuestMemory(layout.ram_regions(MEM_SIZE)) as mem:
        yield mem


def write(tmp_path: Path, data: bytes, name: str = "kernel") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_elf_segment_loaded_at_paddr_with_bss_zeroed(memory, tmp_path) -> None:
    memory.write(ELF_LOAD_ADDR + len(ELF_PAYLOAD), b"\xff" * ELF_BSS)
    kernel = load_kernel(memory, write(tmp_path, elf_image()))
    assert kernel.kind == "elf"
    assert kernel.entry == ELF_LOAD_ADDR
    assert kernel.load_start == ELF_LOAD_ADDR
    assert kernel.load_end == ELF_LOAD_ADDR + len(ELF_PAYLOAD) + ELF_BSS
    assert kernel.setup_header is None
    assert memory.read(ELF_LOAD_ADDR, len(ELF_PAYLOAD)) == ELF_PAYLOAD
    assert memory.read(ELF_LOAD_ADDR + len(ELF_PAYLOAD), ELF_BSS) == bytes(ELF_BSS)
    assert kernel.cmdline_size == layout.CMDLINE_MAX_SIZE - 1


def test_elf_entry_inside_segment(memory, tmp_path) -> None:
    kernel = load_kernel(memory, write(tmp_path, elf_image(entry=ELF_LOAD_ADDR + 0x40)))
    assert kernel.entry == ELF_LOAD_ADDR + 0x40


def test_elf_empty_segments_ignored(memory, tmp_path) -> None:
    kernel = load_kernel(memory, write(tmp_path, elf_image(empty_segment=True)))
    assert kernel.load_start == ELF_LOAD_ADDR


def test_bzimage_protected_mode_kernel_at_1mib(memory, tmp_path) -> None:
    kernel = load_kernel(memory, write(tmp_path, bzimage()))
    assert kernel.kind == "bzimage"
    assert kernel.load_start == layout.HIMEM_START
    assert kernel.entry == layout.HIMEM_START + 0x200
    assert memory.read(kernel.entry, 9) == b"STARTUP64"
    assert memory.read(layout.HIMEM_START, len(BZ_PAYLOAD)) == BZ_PAYLOAD
    # decompression runs at pref_address (LOAD_PHYSICAL_ADDR) and needs init_size
    assert kernel.load_end == BZ_PREF_ADDRESS + BZ_INIT_SIZE
    assert kernel.initrd_addr_max == BZ_INITRD_ADDR_MAX
    assert kernel.cmdline_size == BZ_CMDLINE_SIZE
    assert kernel.kernel_alignment == BZ_ALIGNMENT


def test_bzimage_setup_header_bytes_kept(memory, tmp_path) -> None:
    image = bzimage()
    kernel = load_kernel(memory, write(tmp_path, image))
    assert kernel.setup_header == image[0x1F1:0x26C]


def test_setup_sects_zero_means_four(memory, tmp_path) -> None:
    image = bytearray(bzimage(setup_sects=4))
    image[0x1F1] = 0
    kernel = load_kernel(memory, write(tmp_path, bytes(image)))
    assert memory.read(kernel.entry, 9) == b"STARTUP64"


@pytest.mark.parametrize("image, message", [
    (b"", "is empty"),
    (b"\x7fELF", "truncated"),
    (b"MZ" + bytes(0x400), "neither an ELF vmlinux nor a bzImage"),
    (elf_image(elf_class=1), "32-bit ELF"),
    (elf_image(machine=3), "not x86-64"),
    (elf_image()[:0x1800], "truncated"),
    (elf_image(paddr=0x8000), "below 1 MiB"),
    (elf_image(paddr=MEM_SIZE - 0x1000), "needs 65 MiB"),
    (elf_image(paddr=0x1_0000_0000), "MMIO gap"),
    (elf_image(entry=0x1234), "entry 0x1234 is outside"),
    (bzimage(version=0x0206), "boot protocol 2.06"),
    (bzimage(xloadflags=0), "no 64-bit entry"),
    (bzimage(loadflags=0), "zImage"),
    (bzimage(boot_flag=0x1234), "0xAA55"),
    (bzimage()[:0x250], "truncated bzImage"),
    (bzimage()[:0x400], "no protected-mode kernel"),
    (bzimage(init_size=MEM_SIZE), "guest memory"),
])
def test_bad_images_rejected_with_a_named_reason(memory, tmp_path, image, message) -> None:
    with pytest.raises(KernelImageError, match=message) as info:
        load_kernel(memory, write(tmp_path, image))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, EmberError)


def test_missing_file(memory, tmp_path) -> None:
    with pytest.raises(KernelImageError, match="does not exist"):
        load_kernel(memory, tmp_path / "nope")


def test_directory_is_not_a_kernel(memory, tmp_path) -> None:
    with pytest.raises(KernelImageError):
        load_kernel(memory, tmp_path)


_FUZZ_MEMORY = None


def _fuzz_memory() -> GuestMemory:
    global _FUZZ_MEMORY
    if _FUZZ_MEMORY is None:
        _FUZZ_MEMORY = GuestMemory(layout.ram_regions(MEM_SIZE))
    return _FUZZ_MEMORY


def _load_bytes(data: bytes) -> None:
    fd, name = tempfile.mkstemp()
    try:
        os.write(fd, data)
        os.close(fd)
        kernel = load_kernel(_fuzz_memory(), name)
        assert layout.HIMEM_START <= kernel.load_start <= kernel.entry < kernel.load_end <= MEM_SIZE
    except KernelImageError as e:
        assert "\n" not in str(e)
    finally:
        os.unlink(name)


def _mutations(image: bytes):
    header_span = min(len(image), 0x1200)
    return st.tuples(
        st.integers(0, len(image)),
        st.lists(st.tuples(st.integers(0, header_span - 1), st.integers(0, 255)), max_size=8))


def _mutate(image: bytes, cut: int, flips) -> bytes:
    data = bytearray(image[:cut])
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["elf", "bzimage"]).flatmap(
    lambda kind: st.tuples(st.just(kind), _mutations(elf_image() if kind == "elf" else bzimage()))))
def test_fuzz_truncations_and_byte_flips_only_raise_kernel_image_error(case) -> None:
    kind, (cut, flips) = case
    image = elf_image() if kind == "elf" else bzimage()
    _load_bytes(_mutate(image, cut, flips))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data) -> None:
    _load_bytes(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0x70, max_size=0x70))
def test_fuzz_random_bzimage_header(header) -> None:
    image = bytearray(bzimage())
    image[0x1F1:0x261] = header
    image[0x202:0x206] = b"HdrS"
    _load_bytes(bytes(image))
