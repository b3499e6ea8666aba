"""What a stalled rig's emulated CPUs are executing, asked of QEMU's human monitor.

The rig's QEMU listens on a monitor socket (qemu.py). When a rig must be
stopped for a stall, ``cpu_report`` samples every CPU's registers a few times
(HMP ``info registers -a``) and names each instruction pointer after the rig
kernel's symbol (its /proc/kallsyms, which the rig's init copies out at boot):
a livelock then shows where it spins. A sample marked "SVME off" was taken
with EFER.SVME clear: either no VM was open, or the CPU was inside a nested
(L2) guest, whose addresses then belong to the Ember guest's kernel.
"""

from __future__ import annotations

import bisect
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PROMPT = b"(qemu) "
EFER_SVME = 1 << 12
REPLY_TIMEOUT_S = 5.0
_CPU = re.compile(r"^CPU#(\d+)", re.MULTILINE)
_FIELD = re.compile(r"\b(RIP|EFER)=([0-9a-f]+)")
_HALTED = re.compile(r"\bHLT=1\b")
_SYMBOL_LINE = re.compile(r"^([0-9a-f]+) [tTwW] (\S+)(?:\s+\[(\S+)\])?$")  # kallsyms: module in brackets


@dataclass(frozen=True)
class CpuSample:
    """One CPU at one moment: where it was, whether halted, whether EFER.SVME was set."""

    cpu: int
    rip: int
    halted: bool
    svme: bool


def hmp(socket_path: Path, command: str, timeout: float = REPLY_TIMEOUT_S) -> str:
    """Run one monitor command; its output (QEMU's line-editing echo dropped)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        _read_until_prompt(sock)
        sock.sendall(command.encode() + b"\n")
        reply = _read_until_prompt(sock)
    text = reply.decode(errors="replace")
    return text.split("\r\n", 1)[1] if "\r\n" in text else text  # the first line echoes the command


def _read_until_prompt(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(PROMPT):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data[:-len(PROMPT)] if data.endswith(PROMPT) else data


def parse_registers(text: str) -> list[CpuSample]:
    """The CPUs in an ``info registers -a`` reply."""
    samples = []
    starts = [(m.start(), int(m.group(1))) for m in _CPU.finditer(text)]
    for (start, cpu), (end, _) in zip(starts, [*starts[1:], (len(text), -1)], strict=False):
        block = text[start:end]
        fields = dict(_FIELD.findall(block))
        if "RIP" in fields:
            efer = int(fields.get("EFER", "0"), 16)
            samples.append(CpuSample(cpu, int(fields["RIP"], 16), bool(_HALTED.search(block)),
                                     bool(efer & EFER_SVME)))
    return samples


class Symbols:
    """A kernel's text symbols, for naming addresses (kallsyms, System.map or ``nm`` lines)."""

    def __init__(self, lines: list[str]) -> None:
        pairs = sorted((int(m.group(1), 16), f"{m.group(3)}:{m.group(2)}" if m.group(3) else m.group(2))
                       for m in map(_SYMBOL_LINE.match, lines) if m)
        self._addresses = [address for address, _ in pairs]
        self._names = [name for _, name in pairs]

    @classmethod
    def read(cls, path: Path) -> Symbols:
        try:
            return cls(path.read_text(errors="replace").splitlines())
        except OSError:
            return cls([])

    def name(self, address: int) -> str:
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return f"{address:#x}"
        return f"{self._names[index]}+{address - self._addresses[index]:#x}"


def cpu_report(socket_path: Path, kallsyms: Path, samples: int = 10, interval_s: float = 0.3) -> str:
    """Where each CPU was over ``samples`` looks, most frequent place first; or why
    the monitor could not say."""
    seen: list[CpuSample] = []
    try:
        for index in range(samples):
            if index:
                time.sleep(interval_s)
            seen += parse_registers(hmp(socket_path, "info registers -a"))
    except OSError as exc:
        return f"(the rig's monitor did not answer: {exc})"
    if not seen:
        return "(the rig's monitor reported no CPUs)"
    symbols = Symbols.read(kallsyms)
    lines = [f"the rig's CPUs over {samples} samples:"]
    for cpu in sorted({s.cpu for s in seen}):
        places = Counter(_place(s, symbols) for s in seen if s.cpu == cpu)
        lines.append(f"  CPU {cpu}: " + ", ".join(f"{place} ×{count}" for place, count in places.most_common(4)))
    return "\n".join(lines)


def _place(sample: CpuSample, symbols: Symbols) -> str:
    name = symbols.name(sample.rip)
    where = ("halted in " if sample.halted else "") + name
    if sample.svme:
        return where
    return f"{where} (SVME off)" if name.startswith("0x") else f"{where} (at {sample.rip:#x}, SVME off)"
