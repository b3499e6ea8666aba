"""Guest CPUID, derived from what KVM supports.

Starts from KVM_GET_SUPPORTED_CPUID (Documentation/virt/kvm/api.rst 4.46) and
gives each vCPU its topology: APIC ids in leaves 0x1, 0xB, 0x1F and AMD
0x8000001E, core counts in leaves 0x4 and 0x80000008 (Intel SDM vol. 2A CPUID;
AMD APM vol. 3 appendix E), the hypervisor bit and the KVM signature leaf
(Documentation/virt/kvm/x86/cpuid.rst). It also sets the TSC-deadline timer
bit, which kernels before 6.14 leave out of KVM_GET_SUPPORTED_CPUID although
the in-kernel LAPIC emulates it (api.rst, "Known KVM API problems"): without
it Linux programs its timer through three or four APIC registers, each a VM
exit, instead of one MSR write.  Pure functions, no ioctls.
"""

from __future__ import annotations

from typing import Iterable

LEAF_VENDOR = 0x0
LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
LEAF_KVM_SIGNATURE = 0x4000_0000
LEAF_KVM_FEATURES = 0x4000_0001
LEAF_AMD_SIZES = 0x8000_0008
LEAF_AMD_TOPOLOGY = 0x8000_001E

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
AMD_VENDOR_EBX = (int.from_bytes(b"Auth", "little"), int.from_bytes(b"Hygo", "little"))

ECX_TSC_DEADLINE = 1 << 24
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28
EBX_APIC_ID_SHIFT = 24
EBX_LOGICAL_COUNT_SHIFT = 16
EBX_LOW_16 = 0xFFFF

CACHE_LEVEL_SHIFT = 5
CACHE_LEVEL_MASK = 0x7
CACHE_SHARING_SHIFT = 14
CACHE_SHARING_MASK = 0xFFF
CACHE_CORES_SHIFT = 26
CACHE_CORES_MASK = 0x3F
LAST_LEVEL_CACHE = 3

TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2
TOPOLOGY_TYPE_SHIFT = 8

AMD_NC_MASK = 0xFF
AMD_APIC_ID_SIZE_SHIFT = 12
AMD_APIC_ID_SIZE_MASK = 0xF


def build_cpuid(supported: Iterable, vcpu_id: int, vcpu_count: int, *, tsc_deadline: bool = False) -> list:
    """A per-vCPU copy of the supported CPUID entries (kvm_cpuid_entry2); ``tsc_deadline``
    announces the TSC-deadline timer (where KVM_CAP_TSC_DEADLINE_TIMER and the in-kernel
    LAPIC are there)."""
    if not 0 <= vcpu_id < vcpu_count:
        raise ValueError(f"vcpu_id {vcpu_id} outside 0..{vcpu_count - 1}")
    entries = [type(e).from_buffer_copy(e) for e in _entries(supported)]
    amd = any(e.function == LEAF_VENDOR and e.ebx in AMD_VENDOR_EBX for e in entries)
    for entry in entries:
        _patch(entry, vcpu_id, vcpu_count, amd)
        if tsc_deadline and entry.function == LEAF_FEATURES:
            entry.ecx |= ECX_TSC_DEADLINE
    if entries and not any(e.function == LEAF_KVM_SIGNATURE for e in entries):
        entries.append(_kvm_signature(type(entries[0])(), entries))
    return entries


def _entries(supported) -> list:
    """Entries from a list or a kvm_cpuid2-style structure (nent + entries)."""
    if hasattr(supported, "nent"):
        return list(supported.entries[:supported.nent])
    return list(supported)


def _patch(entry, vcpu_id: int, vcpu_count: int, amd: bool) -> None:
    function = entry.function
    if function == LEAF_FEATURES:
        _patch_features(entry, vcpu_id, vcpu_count)
    elif function == LEAF_CACHE_PARAMS:
        _patch_cache(entry, vcpu_count)
    elif function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
        _patch_topology(entry, vcpu_id, vcpu_count)
    elif function == LEAF_KVM_SIGNATURE:
        _kvm_signature(entry, [])
    elif function == LEAF_AMD_SIZES and amd:
        bits = _bits_for(vcpu_count)
        entry.ecx = ((entry.ecx & ~(AMD_NC_MASK | AMD_APIC_ID_SIZE_MASK << AMD_APIC_ID_SIZE_SHIFT))
                     | (vcpu_count - 1) | (bits << AMD_APIC_ID_SIZE_SHIFT))
    elif function == LEAF_AMD_TOPOLOGY and amd:
        entry.eax = vcpu_id  # extended APIC id
        entry.ebx = (entry.ebx & ~EBX_LOW_16) | (vcpu_id & 0xFF)  # core id, 1 thread/core
        entry.ecx = 0  # node 0, one node


def _patch_features(entry, vcpu_id: int, vcpu_count: int) -> None:
    entry.ebx = ((entry.ebx & EBX_LOW_16) | (vcpu_id << EBX_APIC_ID_SHIFT)
                 | ((vcpu_count & 0xFF) << EBX_LOGICAL_COUNT_SHIFT))
    entry.ecx |= ECX_HYPERVISOR
    if vcpu_count > 1:
        entry.edx |= EDX_HTT
    else:
        entry.edx &= ~EDX_HTT


def _patch_cache(entry, vcpu_count: int) -> None:
    """Cores per package; the last-level cache is shared by all vCPUs."""
    level = (entry.eax >> CACHE_LEVEL_SHIFT) & CACHE_LEVEL_MASK
    sharing = vcpu_count - 1 if level == LAST_LEVEL_CACHE else 0
    eax = entry.eax & ~(CACHE_CORES_MASK << CACHE_CORES_SHIFT | CACHE_SHARING_MASK << CACHE_SHARING_SHIFT)
    eax |= (min(vcpu_count - 1, CACHE_CORES_MASK) << CACHE_CORES_SHIFT)
    eax |= (min(sharing, CACHE_SHARING_MASK) << CACHE_SHARING_SHIFT)
    entry.eax = eax


def _patch_topology(entry, vcpu_id: int, vcpu_count: int) -> None:
    """One thread per core, vcpu_count cores per package; EDX = x2APIC id."""
    if entry.index == 0:
        entry.eax, entry.ebx = 0, 1
        entry.ecx = TOPOLOGY_LEVEL_SMT << TOPOLOGY_TYPE_SHIFT
    elif entry.index == 1:
        entry.eax, entry.ebx = _bits_for(vcpu_count), vcpu_count
        entry.ecx = TOPOLOGY_LEVEL_CORE << TOPOLOGY_TYPE_SHIFT | 1
    else:
        entry.eax = entry.ebx = 0
        entry.ecx = entry.index & 0xFF
    entry.edx = vcpu_id


def _kvm_signature(entry, others: list):
    """Leaf 0x40000000: "KVMKVMKVM\\0\\0\\0" and the highest KVM leaf."""
    entry.function = LEAF_KVM_SIGNATURE
    has_features = not others or any(e.function == LEAF_KVM_FEATURES for e in others)
    entry.eax = LEAF_KVM_FEATURES if has_features else LEAF_KVM_SIGNATURE
    entry.ebx, entry.ecx, entry.edx = (int.from_bytes(KVM_SIGNATURE[i:i + 4], "little")
                                       for i in (0, 4, 8))
    return entry


def _bits_for(count: int) -> int:
    """Bits an APIC id field needs for ``count`` ids (ceil(log2))."""
    return max(count - 1, 0).bit_length()
