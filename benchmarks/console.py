"""A VMM process under watch: spawned with its serial console on a pipe, lines timestamped.

The same event is timed the same way for every VMM: the guest prints a marker
line on its console and the harness notes when that line arrives on the pipe,
counted from the moment the process was spawned (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

log = logging.getLogger(__name__)

READ_CHUNK = 65536
KILL_GRACE_S = 3.0
DEATH_WAIT_S = 30.0
NS_PER_S = 1e9


class BenchError(Exception):
    """A benchmark run failed (the guest never printed what it should have)."""


class ConsoleProcess:
    """Spawn ``argv``; collect stdout lines with their arrival time and all of stderr."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.argv = argv
        self.name = name or os.path.basename(argv[0])
        self._cond = threading.Condition()
        self._lines: list[tuple[int, str]] = []
        self._partial = b""
        self._stderr = bytearray()
        self._closed = False
        self.spawned_ns = time.monotonic_ns()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, start_new_session=True)
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, READ_CHUNK):
            now = time.monotonic_ns()
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            with self._cond:
                self._lines.extend((now, line.decode(errors="replace").rstrip("\r")) for line in complete)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, READ_CHUNK):
            self._stderr += chunk

    def wait_for(self, marker: str, timeout: float) -> float:
        """Seconds from spawn until a console line equal to ``marker`` arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for stamp, line in self._lines:
                    if line.strip() == marker:
                        return (stamp - self.spawned_ns) / NS_PER_S
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    break
                self._cond.wait(timeout=left)
        why = "exited" if self._closed else f"did not print it within {timeout:g} s"
        last = self.console_tail(1).strip() or "(nothing)"
        raise BenchError(f"{self.name}: waited for {marker!r} but the VMM {why}; last console line: {last!r}\n"
                         f"console tail:\n{self.console_tail()}\nstderr tail:\n{self.stderr_text()[-1500:]}")

    def console_lines(self) -> list[str]:
        with self._cond:
            return [line for _, line in self._lines]

    def console_tail(self, lines: int = 15) -> str:
        with self._cond:
            return "\n".join(line for _, line in self._lines[-lines:])

    def stderr_text(self) -> str:
        return self._stderr.decode(errors="replace")

    def finish(self, timeout: float = KILL_GRACE_S) -> int:
        """Let the process exit on its own for ``timeout`` seconds, then kill its session."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.debug("killing %s (pid %d)", self.argv[0], self.pid)
            os.killpg(self.pid, signal.SIGKILL)
            try:
                return self.proc.wait(timeout=DEATH_WAIT_S)
            except subprocess.TimeoutExpired:  # stuck in the kernel (seen in the rig): leave it
                raise BenchError(f"{self.name} (pid {self.pid}) did not die within {DEATH_WAIT_S:g} s "
                                 "of SIGKILL") from None
        finally:
            for reader in self._readers:
                reader.join(timeout=KILL_GRACE_S)

    def __enter__(self) -> "ConsoleProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.finish(timeout=0)
