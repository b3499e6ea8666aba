"""Which host kernel module an address lies in, from /proc/modules.

A guest's instruction pointer never points into the host's modules: the guest
cannot even see them. When a stuck vCPU's rip does (seen in the rig, under
QEMU's emulated AMD-V: the rip of kvm_amd's VMRUN path, in the host's module
space), the host has put its own state into the guest's registers. That guest is
lost to an emulator or host-kernel fault, not to anything the VMM did, and a
report should say so (the rig's test runner reruns such a test once). A guest
with modules of its own runs in the same virtual range, so the report only says
where the address lies; Ember's own guest kernels have no modules.
"""

from __future__ import annotations

from pathlib import Path

PROC_MODULES = Path("/proc/modules")
HOST_MODULE_MARK = "points into the host kernel's module"
"""The words a vCPU report uses for such a rip (the rig's test runner looks for them)."""


def module_ranges(text: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of every module with a visible address in /proc/modules text.

    Without the privilege to see addresses (kptr_restrict) every address reads 0: none then."""
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        try:
            size, start = int(fields[1]), int(fields[5], 16)
        except ValueError:
            continue
        if start and size:
            ranges.append((start, start + size, fields[0]))
    return ranges


def host_module_at(address: int, proc_modules: Path = PROC_MODULES) -> str | None:
    """The name of the host kernel module whose memory holds ``address``, or None."""
    try:
        text = proc_modules.read_text()
    except OSError:
        return None
    return next((name for start, end, name in module_ranges(text) if start <= address < end), None)
