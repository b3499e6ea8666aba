"""Dirty-page logging, and ioctl failures surfacing as KvmError naming the ioctl."""

from __future__ import annotations

import errno

import pytest

from ember.errors import EmberError
from ember.kvm import Kvm, KvmError
from ember.kvm import structs as s
from tests.guests import AX, KVM_SKIP_REASON, Asm, MicroGuest, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]


def test_dirty_log_reports_the_page_the_guest_wrote_and_then_clears():
    code = Asm().mov(AX, 0xFFFF).store(0x5004, 2).hlt().bytes()
    with MicroGuest(code, track_dirty=True) as guest:
        assert guest.run_until_exit() == s.KVM_EXIT_HLT
        first = guest.memory.dirty_pages(guest.vm)
        assert 0x5000 in first
        assert all(page % 0x1000 == 0 and page not in (0x4000, 0x6000) for page in first)
        assert 0x5000 not in guest.memory.dirty_pages(guest.vm)


def test_dirty_log_without_tracking_fails_naming_the_ioctl():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        with pytest.raises(KvmError, match=r"^KVM_GET_DIRTY_LOG failed: ENOENT"):
            guest.memory.dirty_pages(guest.vm)


def test_overlapping_memory_slot_is_rejected_naming_the_ioctl():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        region = guest.memory.regions[0]
        with pytest.raises(KvmError) as info:
            guest.vm.set_user_memory_region(7, 0x0, 0x1000, region.host_addr)
        assert info.value.errno == errno.EEXIST
        assert str(info.value).startswith("KVM_SET_USER_MEMORY_REGION failed: EEXIST (")


def test_bad_slot_and_misaligned_size_are_rejected():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        addr = guest.memory.regions[0].host_addr
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION failed: EINVAL"):
            guest.vm.set_user_memory_region(0xFFFF, 0x100000, 0x1000, addr)
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION failed: EINVAL"):
            guest.vm.set_user_memory_region(3, 0x100000, 0x123, addr)


def test_duplicate_vcpu_id_is_rejected():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        with pytest.raises(KvmError, match=r"^KVM_CREATE_VCPU failed: EEXIST"):
            guest.vm.create_vcpu(0)


def test_unknown_msr_is_reported():
    with MicroGuest(Asm().hlt().bytes()) as guest:
        with pytest.raises(KvmError, match=r"KVM_SET_MSRS failed: .*MSR 0xdeadbeef"):
            guest.vcpus[0].set_msrs({0xDEADBEEF: 1})


def test_missing_device_is_a_one_line_ember_error(tmp_path):
    with pytest.raises(EmberError, match="does not exist") as info:
        Kvm(str(tmp_path / "no-kvm"))
    assert "\n" not in str(info.value)
    assert not isinstance(info.value, KvmError)
