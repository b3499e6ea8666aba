"""What the local KVM offers: hardware virtualization, PVM, or nothing.

Hardware KVM needs the CPU's VMX (Intel VT-x) or SVM (AMD-V) flag in
/proc/cpuinfo and a usable /dev/kvm (KVM API doc, section 4.1); PVM is the
software KVM of the kvm_pvm module, which runs micro-guests but no stock Linux.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KvmKind = Literal["hardware", "pvm", "none"]
HARDWARE_FLAGS = {"vmx": "Intel VT-x", "svm": "AMD-V"}
KVM_DEVICE = Path("/dev/kvm")
PVM_MODULE = Path("/sys/module/kvm_pvm")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class HostKvm:
    """The verdict: which KVM this host has, in words, and whether Linux boots on it."""

    kind: KvmKind
    detail: str
    can_boot_linux: bool


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first CPU listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def hardware_virt(flags: set[str]) -> str | None:
    """'Intel VT-x' or 'AMD-V' when the flags carry it, else None."""
    for flag, name in HARDWARE_FLAGS.items():
        if flag in flags:
            return name
    return None


def classify(flags: set[str], kvm_usable: bool, pvm_loaded: bool) -> HostKvm:
    """Decide from the facts (pure, so tests can feed it any host)."""
    hardware = hardware_virt(flags)
    if pvm_loaded:
        usable = "usable" if kvm_usable else "not usable"
        return HostKvm("pvm", f"PVM (kvm_pvm, software KVM); /dev/kvm {usable}; stock Linux kernels cannot boot", False)
    if hardware and kvm_usable:
        return HostKvm("hardware", f"{hardware} with a usable /dev/kvm", True)
    if hardware:
        return HostKvm("none", f"{hardware} present but /dev/kvm is missing or not accessible", False)
    return HostKvm("none", "no VMX/SVM CPU flag and no PVM module: no KVM on this host", False)


def kvm_usable(device: Path = KVM_DEVICE) -> bool:
    """True when /dev/kvm exists and this user may open it read-write."""
    return device.exists() and os.access(device, os.R_OK | os.W_OK)


def host_kvm() -> HostKvm:
    """Inspect this host."""
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError:
        cpuinfo = ""
    return classify(cpu_flags(cpuinfo), kvm_usable(), PVM_MODULE.exists())
