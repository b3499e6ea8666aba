"""Progress reporting for long image builds: a rich status line or plain logs.

Interactive builds show the current step, the elapsed time and a count (e.g.
objects compiled) on one live line; quiet builds (tests, CI) log each step
and every few hundred units through ``logging``.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger(__name__)

QUIET_LOG_EVERY = 500


class BuildProgress:
    """Context manager: ``step(name)`` starts a step, ``advance()`` counts units."""

    def __init__(self, title: str, enabled: bool = True, unit: str = "objects") -> None:
        self.title = title
        self.unit = unit
        self.count = 0
        self._step = ""
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task = None
        if enabled:  # rich is imported only here: `ember run` with cached images never loads it
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )

    def __enter__(self) -> BuildProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=None, detail="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        outcome = "failed" if exc_type else "done"
        self._update(f"{outcome} in {self.elapsed():.0f}s")
        if self._progress is not None:
            self._progress.stop()
        log.info("%s: %s in %.0fs", self.title, outcome, self.elapsed())

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def step(self, name: str) -> None:
        """Begin a new named step (e.g. 'extracting sources')."""
        self._step = name
        log.info("%s: %s", self.title, name)
        self._update(name)

    def advance(self, units: int = 1) -> None:
        """Count finished units of work within the current step."""
        before = self.count
        self.count += units
        if self.count // QUIET_LOG_EVERY != before // QUIET_LOG_EVERY:
            log.info("%s: %s: %d %s", self.title, self._step, self.count, self.unit)
        self._update(f"{self._step}: {self.count} {self.unit}")

    def _update(self, detail: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, detail=detail)
