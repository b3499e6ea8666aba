"""Per-vCPU CPUID from synthetic KVM_GET_SUPPORTED_CPUID entries."""

from __future__ import annotations

import pytest

from ember.arch.x86_64.cpuid import build_cpuid
from ember.kvm.structs import kvm_cpuid_entry2, make_cpuid2


def entry(function, index=0, eax=0, ebx=0, ecx=0, edx=0, flags=0):
    e = kvm_cpuid_entry2()
    e.function, e.index, e.flags = function, index, flags
    e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
    return e


GENUINE_EBX = int.from_bytes(b"Genu", "little")


def supported(vendor_ebx=GENUINE_EBX):
    return [
        entry(0, eax=0x1F, ebx=vendor_ebx),
        entry(1, eax=0x806EA, ebx=0x0010_0800, ecx=0x7FFA_FBBF, edx=0x1FAB_FBFF),
        entry(4, 0, eax=0x1C00_4121, flags=1), entry(4, 3, eax=0x1C03_C163, flags=1),
        entry(0xB, 0, flags=1), entry(0xB, 1, flags=1), entry(0xB, 2, flags=1),
        entry(0x1F, 0, flags=1), entry(0x1F, 1, flags=1),
        entry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        entry(0x4000_0001, eax=0x0100_7AFB),
        entry(0x8000_0008, eax=0x3030, ecx=0x7),
        entry(0x8000_001E, eax=5, ebx=0x0105, ecx=0x0103),
    ]


def find(entries, function, index=0):
    (match,) = [e for e in entries if e.function == function and e.index == index]
    return match


@pytest.mark.parametrize("vcpu_id, count", [(0, 1), (0, 4), (3, 4), (7, 8)])
def test_apic_ids_and_counts(vcpu_id, count) -> None:
    out = build_cpuid(supported(), vcpu_id, count)
    leaf1 = find(out, 1)
    assert leaf1.ebx >> 24 == vcpu_id
    assert (leaf1.ebx >> 16) & 0xFF == count
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size kept
    assert bool(leaf1.edx & (1 << 28)) == (count > 1)  # HTT
    for leaf in (0xB, 0x1F):
        for index in (0, 1):
            assert find(out, leaf, index).edx == vcpu_id
    smt, core, invalid = (find(out, 0xB, i) for i in range(3))
    assert (smt.ebx, (smt.ecx >> 8) & 0xFF) == (1, 1)
    assert (core.ebx, (core.ecx >> 8) & 0xFF) == (count, 2)
    assert 1 << core.eax >= count
    assert (invalid.ebx, (invalid.ecx >> 8) & 0xFF, invalid.ecx & 0xFF) == (0, 0, 2)
    l1, l3 = find(out, 4, 0), find(out, 4, 3)
    assert l1.eax >> 26 == count - 1 and (l1.eax >> 14) & 0xFFF == 0
    assert (l3.eax >> 14) & 0xFFF == count - 1
    assert l1.eax & 0x3FFF == 0x0121  # cache type/level bits kept


def test_hypervisor_bit_and_kvm_leaves() -> None:
    out = build_cpuid(supported(), 0, 1)
    assert find(out, 1).ecx & (1 << 31)
    sig = find(out, 0x4000_0000)
    assert sig.eax == 0x4000_0001
    raw = b"".join(v.to_bytes(4, "little") for v in (sig.ebx, sig.ecx, sig.edx))
    assert raw == b"KVMKVMKVM\0\0\0"
    assert find(out, 0x4000_0001).eax == 0x0100_7AFB  # kvm-clock etc. kept


def test_tsc_deadline_timer_announced_only_when_asked() -> None:
    """KVM before 6.14 leaves the bit out of KVM_GET_SUPPORTED_CPUID; the caller knows from the capability."""
    base = supported()
    find(base, 1).ecx &= ~(1 << 24)  # as a 6.1 kernel reports it
    assert not find(build_cpuid(base, 0, 1), 1).ecx & (1 << 24)
    with_timer = find(build_cpuid(base, 0, 1, tsc_deadline=True), 1)
    assert with_timer.ecx & (1 << 24) and with_timer.ecx & (1 << 31)
    assert not find(base, 1).ecx & (1 << 24)  # the caller's entries are left alone


def test_signature_added_when_missing() -> None:
    base = [e for e in supported() if e.function != 0x4000_0000]
    sig = find(build_cpuid(base, 0, 1), 0x4000_0000)
    assert sig.ebx == 0x4B4D564B


def test_input_not_modified_and_accepts_kvm_cpuid2() -> None:
    original = supported()
    out = build_cpuid(make_cpuid2(original), 2, 4)
    assert find(original, 1).ebx == 0x0010_0800
    assert find(out, 1).ebx >> 24 == 2
    assert len(out) == len(original)


def test_amd_topology_leaves_only_on_amd() -> None:
    intel = build_cpuid(supported(), 1, 2)
    assert find(intel, 0x8000_0008).ecx == 0x7
    amd = build_cpuid(supported(int.from_bytes(b"Auth", "little")), 1, 2)
    assert find(amd, 0x8000_0008).ecx & 0xFF == 1
    assert find(amd, 0x8000_001E).eax == 1
    assert find(amd, 0x8000_001E).ebx & 0xFFFF == 1


def test_vcpu_id_out_of_range() -> None:
    with pytest.raises(ValueError):
        build_cpuid(supported(), 4, 4)
