"""How much the suite measures: runs per figure and workload sizes, default and --quick.

The defaults keep the whole suite near 15 minutes inside the rig (QEMU TCG
with nested SVM, where the guest and Ember's Python both run slowly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Settings:
    runs: int = 5
    mem_mib: int = 256
    vcpus: int = 1
    disk_mib: int = 256  # long enough that the dd start-up and the rig's second-to-second pace average out
    net_mib: int = 16
    exits: int = 20_000
    startup_runs: int = 10
    alive_s: float = 3.0       # how long the guest sleeps while its VMM's memory is sampled
    sample_after_s: float = 1.0  # when, after the boot marker, memory is sampled
    vm_timeout_s: float = 300.0
    net_timeout_s: float = 180.0

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT = Settings()
QUICK = Settings(runs=2, disk_mib=16, net_mib=8, exits=5_000, startup_runs=3)


def choose(quick: bool, runs: int | None) -> Settings:
    base = QUICK if quick else DEFAULT
    if runs is None:
        return base
    if runs < 1:
        raise ValueError("--runs must be at least 1")
    return Settings(**{**base.as_dict(), "runs": runs})
