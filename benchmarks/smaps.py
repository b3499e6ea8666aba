"""Resident memory of a VMM process, split into guest RAM and the VMM's own overhead.

Parses /proc/PID/smaps (Linux Documentation/filesystems/proc.rst, "smaps"):
the guest RAM is the anonymous mapping(s) sized like the guest memory (plus
the alignment slack QEMU adds); everything else resident is VMM overhead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HEADER_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
FIELD_RE = re.compile(r"^(\w+):\s+(\d+) kB$")
SLACK_BYTES = 8 << 20  # QEMU over-allocates its RAM block for alignment
KIB = 1024


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str
    rss_kib: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class MemorySplit:
    """Resident set of the process, in KiB: all of it, the guest's RAM, and the rest."""

    total_kib: int
    guest_kib: int

    @property
    def overhead_kib(self) -> int:
        return self.total_kib - self.guest_kib


def parse_smaps(text: str) -> list[Mapping]:
    """Every mapping of a smaps text with its resident size."""
    mappings: list[Mapping] = []
    current: list | None = None
    for line in text.splitlines():
        header = HEADER_RE.match(line)
        if header and not FIELD_RE.match(line):
            if current:
                mappings.append(Mapping(*current))
            current = [int(header.group(1), 16), int(header.group(2), 16), header.group(3).strip(), 0]
            continue
        found = FIELD_RE.match(line)
        if found and current is not None and found.group(1) == "Rss":
            current[3] = int(found.group(2))
    if current:
        mappings.append(Mapping(*current))
    return mappings


def is_guest_ram(mapping: Mapping, mem_bytes: int) -> bool:
    anonymous = mapping.path == "" or mapping.path.startswith("[anon") or mapping.path.startswith("/memfd:")
    return anonymous and mem_bytes <= mapping.size <= mem_bytes + SLACK_BYTES


def split(mappings: list[Mapping], mem_bytes: int) -> MemorySplit:
    """Total resident KiB and the part in the guest-RAM mapping(s)."""
    total = sum(m.rss_kib for m in mappings)
    guest = sum(m.rss_kib for m in mappings if is_guest_ram(m, mem_bytes))
    return MemorySplit(total, guest)


def sample(pid: int, mem_bytes: int) -> MemorySplit:
    """Read /proc/PID/smaps now."""
    return split(parse_smaps(Path(f"/proc/{pid}/smaps").read_text()), mem_bytes)
