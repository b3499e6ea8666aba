"""The boot facade: everything load_guest writes, and what configure_vcpu sets."""

from __future__ import annotations

import pytest

from ember.arch.x86_64 import boot, layout, paging, regs
from ember.errors import ConfigError
from ember.kvm.structs import kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_sregs
from ember.memory import GuestMemory

from test_arch_images import ELF_LOAD_ADDR, bzimage, elf_image

MEM_SIZE = 64 * layout.MiB


@pytest.fixture
def memory():
    with GuestMemory(layout.ram_regions(MEM_SIZE)) as mem:
        yield mem


def test_load_guest_writes_every_boot_structure(memory, tmp_path) -> None:
    (tmp_path / "vmlinux").write_bytes(elf_image())
    (tmp_path / "initrd").write_bytes(b"070701" + bytes(5000))
    info = boot.load_guest(memory, kernel_path=tmp_path / "vmlinux", initrd_path=tmp_path / "initrd",
                           cmdline="console=ttyS0", mem_size=MEM_SIZE, vcpu_count=2)
    assert info.entry == ELF_LOAD_ADDR
    assert info.zero_page == layout.ZERO_PAGE_START
    gpa, size = info.initrd
    assert memory.read(gpa, 6) == b"070701" and size == 5006
    assert memory.read_u32(info.zero_page + 0x218) == gpa
    assert memory.read_u32(info.zero_page + 0x21C) == size
    assert memory.read(layout.CMDLINE_START, 14) == b"console=ttyS0\0"
    assert memory.read(layout.MPTABLE_START, 4) == b"_MP_"
    assert memory.read_u64(layout.GDT_START + 0x10) == 0x00AF_9B00_0000_FFFF
    for gpa_, data in paging.page_tables().items():
        assert memory.read(gpa_, len(data)) == data


def test_load_guest_bzimage_without_initrd(memory, tmp_path) -> None:
    (tmp_path / "bzImage").write_bytes(bzimage())
    info = boot.load_guest(memory, kernel_path=tmp_path / "bzImage", initrd_path=None,
                           cmdline="", mem_size=MEM_SIZE, vcpu_count=1)
    assert info.entry == 0x100200 and info.initrd is None
    assert memory.read_u32(info.zero_page + 0x218) == 0


def test_bad_vcpu_count_rejected_before_loading(memory, tmp_path) -> None:
    with pytest.raises(ConfigError):
        boot.load_guest(memory, kernel_path=tmp_path / "missing", initrd_path=None,
                        cmdline="", mem_size=MEM_SIZE, vcpu_count=300)


class FakeVcpu:
    """Records what configure_vcpu sets, through the ember.kvm Vcpu interface."""

    def __init__(self) -> None:
        self.calls: dict[str, object] = {}

    def set_cpuid2(self, entries): self.calls["cpuid"] = list(entries)
    def set_msrs(self, msrs): self.calls["msrs"] = msrs
    def get_fpu(self): return kvm_fpu()
    def set_fpu(self, fpu): self.calls["fpu"] = fpu
    def get_lapic(self): return kvm_lapic_state()
    def set_lapic(self, lapic): self.calls["lapic"] = lapic
    def get_sregs(self): return kvm_sregs()
    def set_sregs(self, sregs): self.calls["sregs"] = sregs
    def set_regs(self, r): self.calls["regs"] = r


def _supported():
    leaf1 = kvm_cpuid_entry2()
    leaf1.function = 1
    return [leaf1]


def test_bsp_gets_long_mode_entry_state() -> None:
    info = boot.BootInfo(0x100_0000, layout.ZERO_PAGE_START, None, None)
    vcpu = FakeVcpu()
    boot.configure_vcpu(vcpu, info, 0, 2, _supported())
    assert vcpu.calls["regs"].rip == 0x100_0000
    assert vcpu.calls["regs"].rsi == layout.ZERO_PAGE_START
    assert vcpu.calls["sregs"].cs.selector == 0x10
    assert vcpu.calls["sregs"].efer & (1 << 10)
    assert vcpu.calls["msrs"] == regs.boot_msrs()
    assert vcpu.calls["fpu"].fcw == 0x37F
    assert vcpu.calls["cpuid"][0].ebx >> 24 == 0


def test_ap_gets_no_entry_state() -> None:
    info = boot.BootInfo(0x100_0000, layout.ZERO_PAGE_START, None, None)
    vcpu = FakeVcpu()
    boot.configure_vcpu(vcpu, info, 1, 2, _supported())
    assert "regs" not in vcpu.calls and "sregs" not in vcpu.calls
    assert vcpu.calls["cpuid"][0].ebx >> 24 == 1
    assert "msrs" in vcpu.calls and "lapic" in vcpu.calls


def _real_kernel():
    from ember.images.kernel import cached_kernel
    return cached_kernel()


@pytest.mark.parametrize("artifact, kind", [("vmlinux", "elf"), ("kernel", "bzimage")])
def test_real_kernel_loads(artifact, kind, tmp_path) -> None:
    paths = _real_kernel()
    if paths is None:
        pytest.skip("no guest kernel built yet in the ember cache (ember.images.kernel.build_kernel)")
    with GuestMemory(layout.ram_regions(256 * layout.MiB)) as memory:
        info = boot.load_guest(memory, kernel_path=paths[artifact], initrd_path=None,
                               cmdline="console=ttyS0", mem_size=256 * layout.MiB, vcpu_count=2)
        assert info.kernel.kind == kind
        assert info.kernel.load_start <= info.entry < info.kernel.load_end
        assert memory.read(info.zero_page + 0x202, 4) == b"HdrS"
        if kind == "bzimage":
            assert memory.read_u16(info.zero_page + 0x206) >= 0x020C
