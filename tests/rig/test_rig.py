"""Tests of the rig itself (they boot QEMU on the host; never shipped into the rig).

Each test is one rig boot: status, time limit, streaming, the out share, and
that the rig's L1 offers hardware-style KVM fast enough for micro-guests.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

import ember.rig as rig

REPO = Path(__file__).resolve().parents[2]
HANG_TIMEOUT = 30
STALL_S = 15


def test_exit_status_and_environment_come_back(capfd: pytest.CaptureFixture[str]) -> None:
    status = rig.run(["sh", "-c", 'echo "in-rig=$EMBER_IN_RIG cwd=$(pwd)"; echo to-stderr >&2; exit 7'],
                     cwd=REPO, timeout=120)
    out, err = capfd.readouterr()
    assert status == 7
    assert f"in-rig=1 cwd={REPO}" in out
    assert "to-stderr" in err and "to-stderr" not in out


def test_kvm_inside_has_svm_and_runs_micro_guests_fast(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    script = (
        "set -e; grep -c -w svm /proc/cpuinfo > \"$OUT/svm\"; test -c /dev/kvm; "
        "python3 -c 'from tests.guests import time_loop_guest; print(time_loop_guest(10_000_000))' > \"$OUT/loop\""
    )
    status = rig.run(["sh", "-c", script], cwd=REPO, timeout=240, out_dir=tmp_path, env={"OUT": str(tmp_path)})
    out, err = capfd.readouterr()
    assert status == 0, out + err
    assert int((tmp_path / "svm").read_text()) >= 1
    elapsed = float((tmp_path / "loop").read_text())
    assert 0 < elapsed < 1.0, f"10M-iteration micro-guest took {elapsed:.2f} s inside the rig"


def test_a_hung_command_is_stopped_at_the_limit(capfd: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    status = rig.run(["sleep", "1000"], timeout=HANG_TIMEOUT)
    took = time.monotonic() - started
    _out, err = capfd.readouterr()
    assert status == rig.TIMEOUT_STATUS
    assert HANG_TIMEOUT <= took < HANG_TIMEOUT + 20
    assert f"did not finish within {HANG_TIMEOUT} s" in err


def test_a_command_that_stops_making_progress_is_stopped_early(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """The watch sees writes made inside the rig (9p) and stops the rig once they cease."""
    beat = tmp_path / "beat"
    script = 'for i in 1 2 3; do echo "$i" > "$OUT/beat"; sleep 3; done; sleep 1000'
    started = time.monotonic()
    status = rig.run(["sh", "-c", script], timeout=240, out_dir=tmp_path, env={"OUT": str(tmp_path)},
                     watch=rig.ProgressWatch(beat, stall_s=STALL_S))
    took = time.monotonic() - started
    _out, err = capfd.readouterr()
    assert status == rig.TIMEOUT_STATUS, err
    assert beat.read_text().strip() == "3"  # the beats were seen, so the clock ran from the last one
    assert f"showed no progress in beat for {STALL_S} s" in err
    assert 6 + STALL_S <= took < 120


class _TimedSink(io.TextIOBase):
    """A stdout stand-in that records when each piece of text arrived."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.pieces.append((time.monotonic(), text))
        return len(text)

    def arrival(self, needle: str) -> float:
        seen = ""
        for when, text in self.pieces:
            seen += text
            if needle in seen:
                return when
        raise AssertionError(f"{needle!r} never arrived; got {seen!r}")


def test_output_streams_while_the_command_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = _TimedSink()
    monkeypatch.setattr("sys.stdout", sink)
    status = rig.run(["sh", "-c", "echo first-line; sleep 4; echo second-line"], timeout=120)
    assert status == 0
    assert sink.arrival("second-line") - sink.arrival("first-line") >= 3
