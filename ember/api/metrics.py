"""Firecracker-style metrics: one JSON object per line, flushed on demand and each minute.

Follows Firecracker's metrics system (docs/metrics.md): the file or named pipe
comes from ``--metrics-path`` or ``PUT /metrics``; a line is written on the
``FlushMetrics`` action and every 60 s. API request counters use Firecracker's
group and key names and, as there, count what happened since the last flush.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Callable

from ember.errors import ConfigError

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 60.0
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
_FILE_MODE = 0o640

MetricsSource = Callable[[], dict]


class ApiCounters:
    """Request counters per group (``put_api_requests``...), reset by ``take``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def inc(self, group: str, key: str) -> None:
        with self._lock:
            self._counts[group][key] += 1

    def take(self) -> dict[str, dict[str, int]]:
        """The counts since the previous take (Firecracker's delta semantics)."""
        with self._lock:
            counts = {group: dict(keys) for group, keys in self._counts.items()}
            self._counts.clear()
        return counts


class MetricsSink:
    """Writes metrics lines to one file; a timer thread flushes every minute."""

    def __init__(self, source: MetricsSource, interval: float = FLUSH_INTERVAL_S) -> None:
        self._source = source
        self._interval = interval
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.path: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def configured(self) -> bool:
        return self._fd is not None

    def configure(self, path: str) -> None:
        """Open the metrics target and start the periodic flush. Raises ConfigError."""
        try:
            fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        except OSError as err:
            raise ConfigError(f"Cannot open the metrics file: {err.strerror}: {path}") from None
        with self._lock:
            self._fd, self.path = fd, path
        self._thread = threading.Thread(target=self._run, name="fc_metrics", daemon=True)
        self._thread.start()

    def flush(self) -> bool:
        """Write one line now; False when no target is configured."""
        if self._fd is None:
            return False
        with self._lock:  # one line at a time: a line's "since the last line" counters need order
            if self._fd is None:
                return False
            line = json.dumps(self._source(), sort_keys=True, default=str) + "\n"
            try:
                os.write(self._fd, line.encode())
            except OSError as err:
                log.warning("cannot write metrics to %s: %s", self.path, err.strerror)
                return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        """Flush a last line, stop the timer and close the target."""
        self._stop.set()
        if self._fd is not None:
            self.flush()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def utc_timestamp_ms() -> int:
    return time.time_ns() // 1_000_000
