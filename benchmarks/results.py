"""The benchmark results: one Measure per figure, saved and loaded as JSON.

A Measure holds every run's value for Ember and for its reference (QEMU, or
the C "native VMM floor" for the VM-exit round trip), where it was measured,
and the ratio target it is judged by; ``missing`` says why it has no numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.stats import Better, meets, ratio

RESULTS_NAME = "results.json"


@dataclass
class Measure:
    """One figure of the report."""

    key: str
    title: str
    unit: str
    better: Better
    where: str
    ember: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    reference_name: str = "QEMU"
    target: float | None = None
    note: str = ""
    missing: str | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.ember, self.reference)

    @property
    def met(self) -> bool | None:
        return meets(self.ratio, self.target, self.better)


@dataclass
class Results:
    """Everything one suite run produced: measures, machine facts, Ember's exit profile."""

    measures: list[Measure] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)

    def add(self, measure: Measure) -> Measure:
        self.measures.append(measure)
        return measure

    def merge(self, other: "Results") -> None:
        self.measures.extend(other.measures)
        self.meta.update(other.meta)
        self.profile.update(other.profile)


def to_json(results: Results) -> str:
    return json.dumps(asdict(results), indent=2, sort_keys=True)


def from_json(text: str) -> Results:
    raw = json.loads(text)
    measures = [Measure(**m) for m in raw.get("measures", [])]
    return Results(measures, raw.get("meta", {}), raw.get("profile", {}))


def save(results: Results, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_NAME
    path.write_text(to_json(results))
    return path


def load(directory: Path) -> Results:
    return from_json((directory / RESULTS_NAME).read_text())
