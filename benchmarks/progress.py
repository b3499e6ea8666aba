"""Progress while the suite runs: a rich progress bar on a terminal, plain lines elsewhere.

Inside the rig the output is a pipe streamed back to the host, so every step
is also a line of its own there.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Steps:
    """Count steps of known total; ``step(text)`` announces the next one."""

    def __init__(self, total: int, title: str) -> None:
        self.console = Console(stderr=True)
        self.total = total
        self.done = 0
        self._bar: Progress | None = None
        if self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
            self._task = self._bar.add_task(title, total=total)
            self._bar.start()

    def step(self, text: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)
        else:
            self.console.print(f"[{self.done}/{self.total}] {text}", highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
