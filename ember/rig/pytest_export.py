"""A pytest plugin that writes each test's result to a JSON file.

Loaded inside the rig (``-p ember.rig.pytest_export --ember-results=PATH``)
so the host can report the rig's results as its own pytest results; uses
pytest's reporting hooks (pytest_runtest_logreport, pytest_collectreport).
The file is rewritten as each test starts and ends, so when the rig is
stopped part-way the host still learns every finished outcome and which
test was running (outcome ``running``). A heartbeat file beside it is
rewritten every few seconds, so the host can tell a slow test from an
emulated host that stopped.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

RESULTS_OPTION = "--ember-results"
RUNNING = "running"
HEARTBEAT_EVERY_S = 5.0


def heartbeat_path(results: Path) -> Path:
    """Where the heartbeat of the results file ``results`` is written."""
    return results.with_name(results.name + ".heartbeat")


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` as a new file that replaces ``path``: what the host sees through 9p."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _beat(path: Path, stop: threading.Event) -> None:
    while True:
        try:
            _replace_file(path, f"{time.time():.0f}\n")
        except OSError:
            pass  # the host side reads silence as a stall; nothing to do about it here
        if stop.wait(HEARTBEAT_EVERY_S):
            return


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(RESULTS_OPTION, default=None, help="write per-test results as JSON to this path")


def _reason(report: pytest.TestReport) -> str:
    """A skip's reason from its (path, line, 'Skipped: why') longrepr."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


class ResultExport:
    """Folds the setup/call/teardown reports of each test into one result."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}

    def _entry(self, nodeid: str) -> dict[str, Any]:
        return self.results.setdefault(nodeid, {"outcome": "passed", "longrepr": "", "reason": "", "duration": 0.0})

    def write(self) -> None:
        _replace_file(self.path, json.dumps(self.results, indent=1))

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._entry(nodeid)["outcome"] = RUNNING
        self.write()

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        entry = self._entry(nodeid)
        if entry["outcome"] == RUNNING:
            entry["outcome"] = "passed"
        self.write()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self._entry(report.nodeid)
        entry["duration"] += report.duration
        wasxfail = getattr(report, "wasxfail", None)
        if wasxfail is not None and report.when == "call":
            entry.update(outcome="xfailed" if report.skipped else "xpassed", reason=str(wasxfail))
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
            if entry["outcome"] not in ("failed", "error"):
                entry["outcome"] = outcome
            entry["longrepr"] += f"[{report.when}] {report.longreprtext}\n"
        elif report.skipped and entry["outcome"] in (RUNNING, "passed"):
            entry.update(outcome="skipped", reason=_reason(report))

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.results[report.nodeid] = {"outcome": "error", "longrepr": report.longreprtext,
                                           "reason": "", "duration": 0.0}

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        self.write()


def pytest_configure(config: pytest.Config) -> None:
    target = config.getoption(RESULTS_OPTION)
    if target:
        config.pluginmanager.register(ResultExport(Path(target)), "ember-result-export")
        stop = threading.Event()
        config.add_cleanup(stop.set)
        threading.Thread(target=_beat, args=(heartbeat_path(Path(target)), stop), name="ember-heartbeat",
                         daemon=True).start()
