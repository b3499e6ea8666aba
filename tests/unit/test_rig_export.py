"""The rig's result export plugin, run on a small synthetic test file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from ember.rig.pytest_tiers import rig_pytest_argv, tier_of

SAMPLE = textwrap.dedent("""\
    import pytest

    def test_ok():
        pass

    def test_bad():
        assert 1 == 2, "one is not two"

    @pytest.mark.skip(reason="not today")
    def test_skipped():
        pass

    @pytest.mark.xfail(reason="known")
    def test_xfail():
        assert False

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture broke")

    def test_setup_error(broken):
        pass
""")


def test_export_writes_one_result_per_test(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    results = tmp_path / "out" / "results.json"
    results.parent.mkdir()
    argv = rig_pytest_argv(["test_sample.py"], results)
    assert argv[0] == sys.executable
    done = subprocess.run([*argv, "-q", "-p", "no:randomly"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    got = json.loads(results.read_text())
    outcome = {nodeid.split("::")[1]: entry["outcome"] for nodeid, entry in got.items()}
    assert outcome == {"test_ok": "passed", "test_bad": "failed", "test_skipped": "skipped",
                       "test_xfail": "xfailed", "test_setup_error": "error"}
    assert "one is not two" in got["test_sample.py::test_bad"]["longrepr"]
    assert got["test_sample.py::test_skipped"]["reason"] == "not today"
    assert "fixture broke" in got["test_sample.py::test_setup_error"]["longrepr"]


PROGRESS_SAMPLE = textwrap.dedent("""\
    import json, os, time

    def test_first():
        pass

    def test_sees_itself_running():
        got = json.loads(open(os.environ["RESULTS"]).read())
        assert got["test_progress.py::test_first"]["outcome"] == "passed"
        assert got["test_progress.py::test_sees_itself_running"]["outcome"] == "running"
        assert open(os.environ["RESULTS"] + ".heartbeat").read().strip().isdigit()  # beating from the start

    def test_hangs():
        time.sleep(60)

    def test_after_the_hang():
        pass
""")


def test_export_is_written_as_tests_run_and_a_hung_test_fails_alone(tmp_path: Path) -> None:
    """What the host needs when the rig is stopped part-way: finished outcomes,
    and a test that outlives its time limit failing by itself, not the whole run."""
    (tmp_path / "test_progress.py").write_text(PROGRESS_SAMPLE)
    results = tmp_path / "results.json"
    argv = rig_pytest_argv(["test_progress.py"], results, test_timeout=3)
    done = subprocess.run([*argv, "-q"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "RESULTS": str(results)}, timeout=120)
    got = {nodeid.split("::")[1]: entry for nodeid, entry in json.loads(results.read_text()).items()}
    outcomes = {name: entry["outcome"] for name, entry in got.items()}
    assert outcomes == {"test_first": "passed", "test_sees_itself_running": "passed",
                        "test_hangs": "failed", "test_after_the_hang": "passed"}, done.stdout
    assert "Timeout" in got["test_hangs"]["longrepr"]
    assert "time.sleep(60)" in got["test_hangs"]["longrepr"]  # the stack says where it hung


def test_tiers_follow_directories(tmp_path: Path) -> None:
    root = tmp_path / "tests"
    assert tier_of(root / "kvm" / "test_a.py", root) == ("kvm", "kvm")
    assert tier_of(root / "system" / "test_b.py", root) == ("system", "system")
    assert tier_of(root / "rig" / "test_c.py", root) == ("system", "rig")
    assert tier_of(root / "unit" / "test_d.py", root) == (None, "unit")
    assert tier_of(tmp_path / "elsewhere.py", root) == (None, None)


STAND_IN_CONFTEST = textwrap.dedent("""\
    from pathlib import Path
    import ember.rig.pytest_tiers as tiers

    CANNED = {
        "tests/system/test_s.py::test_pass": {"outcome": "passed", "longrepr": "", "reason": "", "duration": 1.0},
        "tests/system/test_s.py::test_fail": {"outcome": "failed", "longrepr": "[call] boom in the rig", "reason": "",
                                              "duration": 1.0},
        "tests/system/test_s.py::test_skip": {"outcome": "skipped", "longrepr": "", "reason": "no disk",
                                              "duration": 0.0},
        "tests/system/test_s.py::test_hung": {"outcome": "running", "longrepr": "the rig was stopped at its 60 s limit",
                                              "reason": "", "duration": 0.0},
        "__rig__": {"longrepr": "the rig was stopped at its 60 s limit"},
    }
    SEEN = []

    def fake_run(config, nodeids):
        SEEN.append(nodeids)
        assert len(SEEN) == 1, "the rig must boot once"
        return CANNED

    tiers._run_in_rig = fake_run

    def pytest_collection_modifyitems(config, items):
        tiers.modify_items(config, items, Path(__file__).parent / "tests")
""")

STAND_IN_TESTS = textwrap.dedent("""\
    import pytest

    @pytest.mark.skipif(True, reason="host-side skipif must not apply")
    def test_pass():
        raise AssertionError("the host must not run the body")

    def test_fail():
        pass

    def test_skip():
        pass

    def test_hung():
        pass

    def test_missing():
        pass
""")


def test_host_items_report_the_rig_outcomes(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(STAND_IN_CONFTEST)
    (tmp_path / "tests" / "system").mkdir(parents=True)
    (tmp_path / "tests" / "system" / "test_s.py").write_text(STAND_IN_TESTS)
    env = {**__import__("os").environ, "EMBER_SYSTEM": "rig"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "tests"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "3 failed, 1 passed, 1 skipped" in out, out
    assert "boom in the rig" in out
    assert "in the rig: no disk" in out
    assert "did not finish in the rig: the rig was stopped at its 60 s limit" in out
    assert out.count("the rig was stopped at its 60 s limit") >= 2  # the hung test and the one never reached


def test_progress_watch_fires_only_after_a_quiet_spell(tmp_path: Path) -> None:
    from ember.rig.qemu import ProgressWatch

    progress = tmp_path / "results.json"
    watch = ProgressWatch(progress, stall_s=10)
    assert not watch.stalled(100.0)  # the clock starts at the first look, file or not
    assert not watch.stalled(109.0)
    progress.write_text("{}")
    assert not watch.stalled(109.5)  # a change restarts the clock
    assert not watch.stalled(119.0)
    assert watch.stalled(119.5)


def test_a_stopped_heartbeat_stops_the_rig_long_before_the_progress_rule(tmp_path: Path) -> None:
    from ember.rig.pytest_export import heartbeat_path
    from ember.rig.qemu import ProgressWatch

    progress = tmp_path / "results.json"
    beat = heartbeat_path(progress)
    watch = ProgressWatch(progress, stall_s=720, heartbeat=beat, heartbeat_stall_s=30)
    assert not watch.stalled(0.0) and not watch.stalled(100.0)  # no heartbeat yet: pytest still starting
    beat.write_text("1")
    assert not watch.stalled(101.0)
    for now in (120.0, 140.0, 160.0):  # a test may run long while the heartbeat goes on
        beat.write_text(str(now))
        assert not watch.stalled(now)
    assert not watch.stalled(189.0)  # the last change seen was at 160
    assert watch.stalled(190.0) and watch.reason == "stopped writing its heartbeat results.json.heartbeat for 30 s"


class _Config:
    """The little of pytest.Config that _run_in_rig touches."""

    def __init__(self, root: Path) -> None:
        self.rootpath = root
        self.stash: dict = {}
        self.pluginmanager = self

    def getplugin(self, name: str) -> None:
        return None


def _fake_rig(wedges_in: str, times: int):
    """A stand-in for ember.rig.run whose boots all stop (the watch) when ``wedges_in``
    starts, the first ``times`` times; every other test passes."""
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    boots: list[list[str]] = []

    def fake_run(argv, *, cwd, timeout, out_dir, watch):
        nodeids = [a for a in argv if a.startswith("tests/")]
        boots.append(nodeids)
        results = Path(next(a for a in argv if a.startswith("--ember-results=")).split("=", 1)[1])
        assert watch.path == results and watch.stall_s == tiers.DEFAULT_TEST_TIMEOUT + tiers.STALL_GRACE_S
        entry, got = {"longrepr": "", "reason": "", "duration": 1.0}, {}
        for nodeid in nodeids:
            if nodeid.endswith(wedges_in) and sum(nodeid in b for b in boots) <= times:
                got[nodeid] = {**entry, "outcome": "running"}
                results.write_text(json.dumps(got))
                watch.tripped = True  # what the real watch does when it stops the rig
                return ember.rig.TIMEOUT_STATUS
            got[nodeid] = {**entry, "outcome": "passed"}
        results.write_text(json.dumps(got))
        return 0

    return fake_run, boots


IDS = [f"tests/system/test_s.py::test_{n}" for n in ("a", "wedged", "c", "d")]


def test_a_rig_that_stops_under_a_test_gets_a_fresh_boot_and_the_test_one_more_try(
        tmp_path, monkeypatch, capsys) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    fake_run, boots = _fake_rig("test_wedged", times=1)
    monkeypatch.setattr(ember.rig, "run", fake_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS, IDS[1:]]
    assert {n: got[n]["outcome"] for n in IDS} == dict.fromkeys(IDS, "passed")
    out = capsys.readouterr().out
    assert (f"the rig was stopped: no test started or ended for {tiers.DEFAULT_TEST_TIMEOUT + tiers.STALL_GRACE_S} s "
            f"while {IDS[1]} was running; {IDS[1]} runs again; a fresh rig boot runs 3 test(s)") in out


def test_a_test_under_which_the_rig_stops_twice_fails_and_the_rest_still_run(tmp_path, monkeypatch) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    fake_run, boots = _fake_rig("test_wedged", times=2)
    monkeypatch.setattr(ember.rig, "run", fake_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS, IDS[1:], IDS[2:]]
    outcomes = {n: got[n]["outcome"] for n in IDS}
    assert outcomes == {IDS[0]: "passed", IDS[1]: "running", IDS[2]: "passed", IDS[3]: "passed"}
    assert f"while {IDS[1]} was running" in got[IDS[1]]["longrepr"]  # reported as not finished


HOST_RIP_HANG = ("ember: microVM Running; exits 306\n  vCPU 0 at rip 0xffffffffc058120c, mp_state runnable; "
                 "that rip points into the host kernel's module kvm_amd (a guest kernel without modules ...)")


def _faulting_rig(faults_in: str, times: int, fault: str = ""):
    """A stand-in for ember.rig.run whose boots all end normally; ``faults_in`` fails the first
    ``times`` times the way a guest triple fault the test did not ask for fails it (or with ``fault``)."""
    import ember.rig.pytest_tiers as tiers

    fault = fault or f"[call] assert 65 == 0\nember: guest triple-fault: {tiers.EMULATOR_FAULT_MARK}"

    boots: list[list[str]] = []

    def fake_run(argv, *, cwd, timeout, out_dir, watch):
        nodeids = [a for a in argv if a.startswith("tests/")]
        boots.append(nodeids)
        results = Path(next(a for a in argv if a.startswith("--ember-results=")).split("=", 1)[1])
        got = {}
        for nodeid in nodeids:
            faulted = nodeid.endswith(faults_in) and sum(nodeid in b for b in boots) <= times
            got[nodeid] = {"outcome": "failed" if faulted else "passed", "reason": "", "duration": 1.0,
                           "longrepr": fault if faulted else ""}
        results.write_text(json.dumps(got))
        return 1 if any(e["outcome"] == "failed" for e in got.values()) else 0

    return fake_run, boots


def test_a_test_whose_guest_triple_faults_runs_once_more_and_says_so(tmp_path, monkeypatch, capsys) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    fake_run, boots = _faulting_rig("test_c", times=1)
    monkeypatch.setattr(ember.rig, "run", fake_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS, [IDS[2]]]
    assert {n: got[n]["outcome"] for n in IDS} == dict.fromkeys(IDS, "passed")
    out = capsys.readouterr().out
    assert (f"ember: {IDS[2]} failed with a guest the emulated CPU broke (a triple fault no test asked for, "
            "or the host's rip in a vCPU) and runs once more; a fresh rig boot runs 1 test(s)") in out
    assert f"ember: {IDS[2]}: ember: guest triple-fault: {tiers.EMULATOR_FAULT_MARK}\n" in out  # the fault's own line


def test_a_hung_guest_running_at_the_hosts_rip_runs_once_more(tmp_path, monkeypatch, capsys) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    fake_run, boots = _faulting_rig("test_c", times=1, fault=f"AssertionError: ... did not end\n{HOST_RIP_HANG}")
    monkeypatch.setattr(ember.rig, "run", fake_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS, [IDS[2]]]
    assert got[IDS[2]]["outcome"] == "passed"
    assert f"ember: {IDS[2]}: vCPU 0 at rip 0xffffffffc058120c" in capsys.readouterr().out


def test_a_second_guest_triple_fault_fails_the_test(tmp_path, monkeypatch) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    fake_run, boots = _faulting_rig("test_c", times=2)
    monkeypatch.setattr(ember.rig, "run", fake_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS, [IDS[2]]]  # one rerun only
    assert got[IDS[2]]["outcome"] == "failed" and tiers.EMULATOR_FAULT_MARK in got[IDS[2]]["longrepr"]


def test_an_ordinary_failure_is_not_rerun(tmp_path, monkeypatch) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers

    fake_run, boots = _faulting_rig("test_c", times=1)

    def plain_failure(argv, **kwargs):
        status = fake_run(argv, **kwargs)
        results = Path(next(a for a in argv if a.startswith("--ember-results=")).split("=", 1)[1])
        got = json.loads(results.read_text())
        for entry in got.values():
            entry["longrepr"] = entry["longrepr"].replace(tiers.EMULATOR_FAULT_MARK, "assert 3 == 0")
        results.write_text(json.dumps(got))
        return status

    monkeypatch.setattr(ember.rig, "run", plain_failure)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS] and got[IDS[2]]["outcome"] == "failed"


def test_a_rig_that_dies_under_a_test_gets_a_fresh_boot_for_it_and_the_rest(tmp_path, monkeypatch, capsys) -> None:
    """The emulated host's kernel panicked in the middle of the tier: QEMU exited without the
    command's status (ember.rig.run raises). The test it was in and those after it go on."""
    import ember.rig
    import ember.rig.pytest_tiers as tiers
    from ember.errors import EmberError

    boots: list[list[str]] = []

    def dying_run(argv, *, cwd, timeout, out_dir, watch):
        nodeids = [a for a in argv if a.startswith("tests/")]
        boots.append(nodeids)
        results = Path(next(a for a in argv if a.startswith("--ember-results=")).split("=", 1)[1])
        entry, got = {"longrepr": "", "reason": "", "duration": 1.0}, {}
        for nodeid in nodeids:
            if len(boots) == 1 and nodeid == IDS[1]:
                got[nodeid] = {**entry, "outcome": "running"}
                results.write_text(json.dumps(got))
                raise EmberError("the rig stopped (qemu exit 0) without the command's exit status; console tail:\n"
                                 "Kernel panic - not syncing: corrupted stack end detected inside scheduler")
            got[nodeid] = {**entry, "outcome": "passed"}
        results.write_text(json.dumps(got))
        return 0

    monkeypatch.setattr(ember.rig, "run", dying_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert boots == [IDS, IDS[1:]]
    assert {n: got[n]["outcome"] for n in IDS} == dict.fromkeys(IDS, "passed")
    out = capsys.readouterr().out
    assert ("ember: the rig failed: the rig stopped (qemu exit 0) without the command's exit status; console tail:; "
            f"{IDS[1]} runs again; a fresh rig boot runs 3 test(s)") in out


def test_a_rig_that_cannot_start_is_tried_a_bounded_number_of_times(tmp_path, monkeypatch) -> None:
    import ember.rig
    import ember.rig.pytest_tiers as tiers
    from ember.errors import EmberError

    boots: list[list[str]] = []

    def broken_run(argv, *, cwd, timeout, out_dir, watch):
        boots.append(argv)
        raise EmberError("the rig needs qemu-system-x86_64")

    monkeypatch.setattr(ember.rig, "run", broken_run)
    got = tiers._run_in_rig(_Config(tmp_path), IDS)
    assert len(boots) == tiers.MAX_RIG_BOOTS
    assert all(n not in got for n in IDS) and "the rig needs" in got[tiers.RIG_KEY]["longrepr"]
