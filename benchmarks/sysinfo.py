"""Facts about where the numbers came from: CPU, cores, memory, kernel and tool versions.

Read from /proc (cpuinfo, meminfo), platform and the tools' --version; the
guest kernel's version is the "Linux version" banner inside its vmlinux.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import ember

from benchmarks.vmm import QEMU

BANNER_RE = re.compile(rb"Linux version (\S+)")
READ_LIMIT = 64 << 20


def _cpuinfo_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "not installed"
    return out.splitlines()[0] if out else "unknown"


def guest_kernel_version(vmlinux: str) -> str:
    with open(vmlinux, "rb") as f:
        found = BANNER_RE.search(f.read(READ_LIMIT))
    return found.group(1).decode(errors="replace") if found else "unknown"


def machine(prefix: str) -> dict[str, str]:
    """CPU model, cores, memory and kernel of this machine, keys prefixed (e.g. 'host_')."""
    return {
        f"{prefix}cpu": _cpuinfo_field("model name"),
        f"{prefix}cores": str(os.cpu_count()),
        f"{prefix}memory": f"{_mem_total_gib():.1f} GiB",
        f"{prefix}kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    return {"ember": ember.__version__, "qemu": qemu_version(), "python": sys.version.split()[0]}


def load_average() -> str:
    """The host's load average: other work on the machine widens the spread of every figure."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())
