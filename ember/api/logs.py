"""Firecracker-style log lines for Ember's ``logging`` records.

Firecracker's logger (``src/vmm/src/logger``) writes
``<local time, ns> [<instance id>:<thread>[:<LEVEL>][:<file>:<line>]] <message>``
to a file or named pipe given by ``--log-path`` or ``PUT /logger``; this module
configures the ``ember`` logger the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ember.errors import ConfigError

TRACE = 5
OFF = logging.CRITICAL + 10
DEFAULT_INSTANCE_ID = "anonymous-instance"
ROOT_LOGGER = "ember"
_LEVELS = {"off": OFF, "error": logging.ERROR, "warning": logging.WARNING, "warn": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE}
_LEVEL_NAMES = {logging.CRITICAL: "ERROR", logging.ERROR: "ERROR", logging.WARNING: "WARN",
                logging.INFO: "INFO", logging.DEBUG: "DEBUG", TRACE: "TRACE"}
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
_FILE_MODE = 0o640

logging.addLevelName(TRACE, "TRACE")


def parse_level(name: str) -> int:
    """Firecracker's level names, case-insensitive, to a ``logging`` level."""
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ConfigError(f"invalid log level {name!r}: "
                          "expected one of Error, Warning, Info, Debug, Trace, Off") from None


def local_timestamp(ns: int | None = None) -> str:
    """Local time with nanoseconds, as Firecracker's ``LocalTime`` prints it."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) + f".{fraction:09d}"


def thread_label(name: str) -> str:
    """Firecracker names its first thread ``main``; Python calls it MainThread."""
    return "main" if name == "MainThread" else name


class FirecrackerFormatter(logging.Formatter):
    """Formats a record the way Firecracker's logger does."""

    def __init__(self, instance_id: str, show_level: bool = False, show_origin: bool = False) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        tag = f"{self.instance_id}:{thread_label(record.threadName or '-')}"
        if self.show_level:
            tag += ":" + _LEVEL_NAMES.get(record.levelno, record.levelname)
        if self.show_origin:
            tag += f":{_origin(record.pathname)}:{record.lineno}"
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"{local_timestamp(int(record.created * 1e9))} [{tag}] {message}"


def _origin(pathname: str) -> str:
    """A source path relative to the checkout, like Firecracker's ``src/...``."""
    if pathname.startswith(_PACKAGE_ROOT + os.sep):
        return pathname[len(_PACKAGE_ROOT) + 1:]
    return pathname


class TargetHandler(logging.StreamHandler):
    """Writes to a file or named pipe without ever blocking; counts lost lines."""

    def __init__(self, path: str) -> None:
        try:
            fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        except OSError as err:
            raise ConfigError(f"Failed to open target file: {err.strerror}: {path}") from None
        super().__init__(os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace"))
        self.path = path
        self.missed = 0

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.missed += 1

    def close(self) -> None:
        with self.lock:
            try:
                self.stream.close()
            except OSError:
                pass
        super().close()


class LogSetup:
    """Owns the handler on the ``ember`` logger; reconfigurable at run time."""

    def __init__(self, instance_id: str = DEFAULT_INSTANCE_ID) -> None:
        self.instance_id = instance_id
        self._lock = threading.Lock()
        self._handler: logging.Handler | None = None

    def configure(self, path: str | None, level: str = "Warning",
                  show_level: bool = False, show_origin: bool = False) -> None:
        """Send ``ember`` logs to ``path`` (stderr when None). Raises ConfigError."""
        levelno = parse_level(level)
        handler = TargetHandler(path) if path else logging.StreamHandler()
        handler.setFormatter(FirecrackerFormatter(self.instance_id, show_level, show_origin))
        logger = logging.getLogger(ROOT_LOGGER)
        with self._lock:
            if self._handler is not None:
                logger.removeHandler(self._handler)
                self._handler.close()
            self._handler = handler
            logger.addHandler(handler)
            logger.setLevel(levelno)
            logger.propagate = False

    @property
    def missed(self) -> int:
        handler = self._handler
        return handler.missed if isinstance(handler, TargetHandler) else 0

    def close(self) -> None:
        """Remove the handler and give the ``ember`` logger back to the root's."""
        logger = logging.getLogger(ROOT_LOGGER)
        with self._lock:
            if self._handler is not None:
                logger.removeHandler(self._handler)
                self._handler.close()
                self._handler = None
                logger.setLevel(logging.NOTSET)
                logger.propagate = True
