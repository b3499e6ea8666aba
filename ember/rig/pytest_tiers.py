"""Ember's test tiers for pytest: markers by directory, and the system tier in the rig.

tests/kvm gets ``kvm`` (skipped, with the reason, without /dev/kvm); tests/system
and tests/rig get ``system``. Where stock Linux cannot boot on the local KVM,
every selected tests/system test runs in ONE rig boot and each host-side item
reports the rig's outcome for its node id (results via ember.rig.pytest_export).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ember.errors import EmberError
from ember.host_modules import HOST_MODULE_MARK
from ember.rig.pytest_export import RUNNING, heartbeat_path
from ember.rig.qemu import TIMEOUT_STATUS

TIER_DIRS = {"kvm": "kvm", "system": "system", "rig": "system"}
RIG_SHIPPED_DIR = "system"
MODE_ENV = "EMBER_SYSTEM"
RIG_TIMEOUT_ENV = "EMBER_RIG_TIMEOUT"
DEFAULT_RIG_TIMEOUT = 3600.0
TEST_TIMEOUT_ENV = "EMBER_RIG_TEST_TIMEOUT"
DEFAULT_TEST_TIMEOUT = 600  # one system test in the rig; the slowest takes about a minute
RIG_KEY = "__rig__"
STALL_GRACE_S = 120  # past a test's own limit, for pytest-timeout to fire and report inside the rig
HEARTBEAT_STALL_S = 120  # the rig's pytest beats every 5 s; this long without one, the emulated host stopped
MAX_RIG_BOOTS = 3
# A guest triple fault no test asked for: seen three times in the rig (twice booting, once powering
# off 2 vCPUs), never in reruns (TCG's nested SVM, as far as we know).
EMULATOR_FAULT_MARK = "guest triple-faulted (KVM_EXIT_SHUTDOWN)"
# A hung guest whose vCPU's rip lies in the rig kernel's kvm_amd (ember.host_modules): the emulated
# AMD-V put the host's VMRUN path into the guest's registers. Seen under Ember and QEMU alike, in about
# one run in ten of a console-heavy guest.
EMULATOR_FAULT_MARKS = (EMULATOR_FAULT_MARK, HOST_MODULE_MARK)
RESULTS_NAME = "rig-results.json"
RIG_DECIDES = ("skip", "skipif", "xfail")
_RESULTS_KEY = pytest.StashKey[dict[str, Any]]()
_PREPARE_KEY = pytest.StashKey[Callable[[], None]]()


def tier_of(path: Path, tests_root: Path) -> tuple[str | None, str | None]:
    """(marker, top directory) of a test file below ``tests_root``."""
    try:
        top = path.relative_to(tests_root).parts[0]
    except (ValueError, IndexError):
        return None, None
    return TIER_DIRS.get(top), top


def system_mode() -> tuple[str, str]:
    """('direct'|'rig'|'skip', why) for the system tier on this host."""
    forced = os.environ.get(MODE_ENV, "").strip()
    if forced in ("direct", "rig", "skip"):
        return forced, f"{MODE_ENV}={forced}"
    if forced:
        return "skip", f"{MODE_ENV}={forced!r} is not one of direct, rig, skip"
    if os.environ.get("EMBER_IN_RIG") == "1":
        return "direct", "running inside the rig"
    from ember.rig import is_available
    from ember.rig.hostcheck import host_kvm

    verdict = host_kvm()
    if verdict.can_boot_linux:
        return "direct", verdict.detail
    if is_available():
        return "rig", f"{verdict.detail}: system tests run inside the rig"
    return "skip", f"{verdict.detail}, and the rig is unavailable (needs qemu-system-x86, busybox-static)"


class RigResultItem(pytest.Item):
    """A host-side stand-in that reports one system test's outcome from the rig."""

    def runtest(self) -> None:
        results = rig_results(self.session)
        entry = results.get(self.nodeid)
        if entry is None:
            raise RigFailure(results.get(RIG_KEY, {}).get("longrepr") or "did not run in the rig")
        outcome = entry["outcome"]
        if outcome == "skipped":
            pytest.skip(f"in the rig: {entry['reason']}")
        if outcome == "xfailed":
            pytest.xfail(entry["reason"])
        if outcome in ("failed", "error"):
            raise RigFailure(f"{outcome} in the rig:\n{entry['longrepr']}")
        if outcome == RUNNING:
            raise RigFailure(f"did not finish in the rig: {entry['longrepr']}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, RigFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} (in the rig)"


class RigFailure(Exception):
    """A system test that failed (or never ran) inside the rig."""


def _stand_in(item: pytest.Item) -> RigResultItem:
    """The rig decides skips and xfails, so only the other markers carry over."""
    twin = RigResultItem.from_parent(item.parent, name=item.name)
    twin.own_markers.extend(m for m in item.own_markers if m.name not in RIG_DECIDES)
    twin.keywords.update({k: v for k, v in item.keywords.items() if k not in RIG_DECIDES})
    if item.config.pluginmanager.hasplugin("timeout"):
        twin.add_marker(pytest.mark.timeout(0))  # the first stand-in waits for the whole rig run
    return twin


def _skip_all(items: list[pytest.Item], reason: str) -> None:
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))


def modify_items(config: pytest.Config, items: list[pytest.Item], tests_root: Path,
                 prepare: Callable[[], None] | None = None) -> None:
    """Mark tiers by directory and route the system tier (call from pytest_collection_modifyitems)."""
    in_rig = os.environ.get("EMBER_IN_RIG") == "1"
    kvm_ok = os.path.exists("/dev/kvm")
    mode, why = system_mode()
    shipped: list[int] = []
    for index, item in enumerate(items):
        marker, top = tier_of(Path(item.path), tests_root)
        if marker:
            item.add_marker(getattr(pytest.mark, marker))
        if marker == "kvm" and not kvm_ok:
            item.add_marker(pytest.mark.skip(reason="tier kvm needs /dev/kvm, which this host lacks"))
        elif top == "rig" and (reason := _rig_test_skip(in_rig, mode, why)):
            item.add_marker(pytest.mark.skip(reason=reason))
        elif top == RIG_SHIPPED_DIR and mode == "skip":
            item.add_marker(pytest.mark.skip(reason=f"system tier skipped: {why}"))
        elif top == RIG_SHIPPED_DIR and mode == "rig":
            shipped.append(index)
    for index in shipped:
        items[index] = _stand_in(items[index])
    if prepare is not None:
        config.stash[_PREPARE_KEY] = prepare


def _rig_test_skip(in_rig: bool, mode: str, why: str) -> str | None:
    """Why tests/rig (which boot QEMU on the host) cannot run here, or None."""
    if in_rig:
        return "tests of the rig run on the host, not inside the rig"
    if mode == "skip":
        return f"system tier skipped: {why}"
    from ember.rig import require_available

    try:
        require_available()
    except EmberError as exc:
        return f"the rig is unavailable: {exc}"
    return None


def rig_results(session: pytest.Session) -> dict[str, Any]:
    """Run all stand-in tests' real versions in one rig boot (once) and load their results."""
    config = session.config
    if _RESULTS_KEY not in config.stash:
        nodeids = [item.nodeid for item in session.items if isinstance(item, RigResultItem)]
        config.stash[_RESULTS_KEY] = _run_in_rig(config, nodeids)
    return config.stash[_RESULTS_KEY]


# Plugins the system tests do not use: importing them over 9p in the rig costs a minute.
RIG_UNUSED_PLUGINS = ["-p", "no:schemathesis", "-p", "no:anyio", "-p", "no:hypothesispytest"]


def rig_pytest_argv(nodeids: list[str], results: Path, test_timeout: int = DEFAULT_TEST_TIMEOUT) -> list[str]:
    """The pytest command the rig runs: the real system tests, each under a time
    limit (pytest-timeout, whose signal method fails just that test with its
    stack), plus the result export."""
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *RIG_UNUSED_PLUGINS,
            "-p", "ember.rig.pytest_export", f"--ember-results={results}",
            f"--timeout={test_timeout}", "--timeout-method=signal", "-v",
            "-o", "console_output_style=classic", *nodeids]


def _emulator_fault(entry: dict[str, Any]) -> bool:
    """A failure whose guest the emulator broke (a triple fault, or the host's rip in the guest's
    registers): reported as such, and rerun once in a fresh boot."""
    text = entry.get("longrepr", "")
    return entry["outcome"] in ("failed", "error") and any(mark in text for mark in EMULATOR_FAULT_MARKS)


def _fault_line(entry: dict[str, Any], limit: int = 400) -> str:
    """The line of a failure's text that reports the emulator's fault (vCPU, registers)."""
    line = next(line for line in entry["longrepr"].splitlines() if any(mark in line for mark in EMULATOR_FAULT_MARKS))
    return line.strip()[:limit]


def _rig_summary(status: int | None, why_stopped: str, results: dict[str, Any]) -> str:
    """One line on how a rig boot ended, for tests that have no outcome of their own."""
    running = [nodeid for nodeid, entry in results.items() if entry.get("outcome") == RUNNING]
    if status == TIMEOUT_STATUS:
        where = f" while {running[0]} was running" if running else ""
        return f"the rig was stopped: {why_stopped}{where}"
    if not results:
        return f"the rig's pytest wrote no results (exit status {status})"
    return f"the rig's pytest ended (exit status {status}) before this test ran"


def _stall_reason(watch) -> str:
    if watch.heartbeat_silent:
        return f"the emulated host stopped (no heartbeat for {watch.heartbeat_stall_s:g} s)"
    return f"no test started or ended for {watch.stall_s:g} s"


def _boot_once(config: pytest.Config, nodeids: list[str], results: Path,
               timeout: float) -> tuple[dict[str, Any], str, int | None]:
    """One rig boot over ``nodeids``: (the outcomes it wrote, how it ended, its exit status)."""
    from ember.rig import ProgressWatch, run

    test_timeout = int(os.environ.get(TEST_TIMEOUT_ENV, DEFAULT_TEST_TIMEOUT))
    watch = ProgressWatch(results, test_timeout + STALL_GRACE_S,
                          heartbeat=heartbeat_path(results), heartbeat_stall_s=HEARTBEAT_STALL_S)
    try:
        status = run(rig_pytest_argv(nodeids, results, test_timeout), cwd=config.rootpath, timeout=timeout,
                     out_dir=results.parent, watch=watch)
        failure = None
    except EmberError as exc:
        status, failure = None, f"the rig failed: {exc}"
    got = json.loads(results.read_text()) if results.exists() else {}
    why = (_stall_reason(watch) if watch.tripped else f"the {RIG_TIMEOUT_ENV} limit ran out")
    summary = failure or _rig_summary(status, why, got)
    for entry in got.values():
        if entry["outcome"] == RUNNING:
            entry["longrepr"] = summary  # the test a stopped boot was in
    return got, summary, status


def _run_in_rig(config: pytest.Config, nodeids: list[str]) -> dict[str, Any]:
    """Run the system tests in the rig; a boot that hangs is stopped once no test has
    started or ended for longer than one test's limit, and the tests it never reached
    get a fresh boot (MAX_RIG_BOOTS in all), so one hang fails one test, not the tier.
    So do the tests a boot left behind when it died (its kernel panicked: QEMU ended
    without the command's exit status; seen once, a stack overflow in the emulated CPU's
    page-fault path).
    The test such a boot was in runs once more: a test that hangs by itself is failed by
    its own limit inside the rig, so a boot that stops progressing is the emulator's.
    So does a test that failed because the emulator broke its guest (EMULATOR_FAULT_MARKS:
    a triple fault, or a hung vCPU whose rip is the host's), once, with a line in the output
    that says so; a second fault fails it."""
    out_dir = Path(tempfile.mkdtemp(prefix="ember-rig-pytest-"))
    capman = config.pluginmanager.getplugin("capturemanager")
    deadline = time.monotonic() + float(os.environ.get(RIG_TIMEOUT_ENV, DEFAULT_RIG_TIMEOUT))
    outcomes: dict[str, Any] = {}
    remaining = list(nodeids)
    retried: set[str] = set()
    try:
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            sys.stdout.write(f"\nember: building guest images, then running {len(nodeids)} "
                             "system test(s) in one rig boot\n")
            sys.stdout.flush()
            prepare = config.stash.get(_PREPARE_KEY, None)
            try:
                if prepare is not None:
                    prepare()
            except EmberError as exc:
                return {RIG_KEY: {"longrepr": f"the guest images could not be built: {exc}"}}
            for boot_number in range(1, MAX_RIG_BOOTS + 1):
                results = out_dir / f"{boot_number}-{RESULTS_NAME}"
                got, summary, status = _boot_once(config, remaining, results, max(deadline - time.monotonic(), 1.0))
                outcomes.update(got)
                outcomes[RIG_KEY] = {"longrepr": summary}
                # A test still "running" when the watch stopped the rig did not hang by itself:
                # its own limit would have failed it inside the rig. The emulated host stopped
                # making progress under it, so it gets one more try in the fresh boot.
                wedged = [n for n, entry in got.items() if entry["outcome"] == RUNNING and n not in retried]
                faulted = [n for n, entry in got.items() if _emulator_fault(entry) and n not in retried]
                retried.update(wedged + faulted)
                unreached = [nodeid for nodeid in remaining if nodeid not in got]
                remaining = wedged + faulted + unreached
                ended_early = status in (TIMEOUT_STATUS, None)  # stopped by the watch, or the rig died
                stopped = ended_early and (wedged or unreached)
                if not (stopped or faulted) or not remaining or time.monotonic() >= deadline:
                    break
                why = [summary.splitlines()[0]] if ended_early else []
                if wedged:
                    why.append(f"{', '.join(wedged)} runs again")
                if faulted:
                    why.append(f"{', '.join(faulted)} failed with a guest the emulated CPU broke (a triple"
                               " fault no test asked for, or the host's rip in a vCPU) and runs once more")
                    for nodeid in faulted:  # where it faulted stays on record when the rerun passes
                        sys.stdout.write(f"\nember: {nodeid}: {_fault_line(got[nodeid])}")
                sys.stdout.write(f"\nember: {'; '.join(why)}; a fresh rig boot runs {len(remaining)} test(s)\n")
                sys.stdout.flush()
        return outcomes
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
