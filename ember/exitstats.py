"""VM-exit accounting: every exit counted by reason and by device, and timed.

Each vCPU thread owns one ``ExitStats`` (no locks on the hot path); the
machine merges them for ``--verbose``, the metrics file and the API. Time is
what Ember spent in user space handling the exit, from KVM_RUN's return to
the next entry. Guest writes that KVM queued in the coalesced MMIO ring
instead of exiting are counted apart, by device, when they are replayed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class ExitStat:
    count: int = 0
    total_ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.total_ns += ns

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


@dataclass
class ExitStats:
    by_reason: dict[str, ExitStat] = field(default_factory=lambda: defaultdict(ExitStat))
    by_target: dict[str, ExitStat] = field(default_factory=lambda: defaultdict(ExitStat))
    coalesced: dict[str, ExitStat] = field(default_factory=lambda: defaultdict(ExitStat))

    def record(self, reason: str, target: str | None, ns: int) -> None:
        self.by_reason[reason].add(ns)
        if target is not None:
            self.by_target[target].add(ns)

    def merge(self, other: "ExitStats") -> None:
        for mine, theirs in ((self.by_reason, other.by_reason), (self.by_target, other.by_target),
                             (self.coalesced, other.coalesced)):
            for key, stat in list(theirs.items()):
                mine[key].count += stat.count
                mine[key].total_ns += stat.total_ns

    @property
    def total(self) -> int:
        return sum(s.count for s in self.by_reason.values())

    def as_dict(self) -> dict:
        def table(d: dict[str, ExitStat]) -> dict:
            return {k: {"count": v.count, "total_ns": v.total_ns} for k, v in sorted(d.items())}

        return {"total": self.total, "by_reason": table(self.by_reason), "by_device": table(self.by_target),
                "coalesced_writes": table(self.coalesced)}
