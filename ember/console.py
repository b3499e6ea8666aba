"""The host side of the guest's serial console.

Guest output goes to stdout or a file; host input (stdin) goes to the guest,
with the terminal in raw mode while the VM runs and restored on exit. The
escape sequence Ctrl-A x ends the VM from the terminal, like QEMU's.
The output sink also watches for the kernel's panic line, so the machine can
tell a panic reboot from an ordinary one.
"""

from __future__ import annotations

import os
import sys
import termios
import tty
from typing import BinaryIO, Callable

from ember.errors import ConfigError

ESCAPE = 0x01  # Ctrl-A
ESCAPE_QUIT = ord("x")
PANIC_MARKER = b"Kernel panic - not syncing"


class ConsoleOutput:
    """Where guest console bytes go, with a watch for the kernel panic line."""

    def __init__(self, stream: BinaryIO | None, close: bool = False) -> None:
        self._stream = stream
        self._close = close
        self._line = bytearray()
        self.panicked = False
        self.bytes_out = 0

    def __call__(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._watch(data)
        if self._stream is not None:
            self._stream.write(data)
            self._stream.flush()

    def _watch(self, data: bytes) -> None:
        self._line += data
        if b"\n" in data:
            *lines, rest = bytes(self._line).split(b"\n")
            if any(PANIC_MARKER in line for line in lines):
                self.panicked = True
            self._line = bytearray(rest[-256:])
        elif len(self._line) > 4096:
            del self._line[:-256]

    def close(self) -> None:
        if self._close and self._stream is not None:
            self._stream.close()


def open_output(spec: str) -> ConsoleOutput:
    """``stdio``, ``none`` or ``file:PATH``."""
    if spec == "stdio":
        return ConsoleOutput(sys.stdout.buffer)
    if spec == "none":
        return ConsoleOutput(None)
    if spec.startswith("file:") and len(spec) > 5:
        path = spec[5:]
        try:
            return ConsoleOutput(open(path, "ab", buffering=0), close=True)
        except OSError as err:
            raise ConfigError(f"cannot open console file {path}: {err.strerror}") from None
    raise ConfigError(f"invalid console {spec!r}: expected stdio, none or file:PATH")


class ConsoleInput:
    """Reads host stdin for the guest; raw mode on a terminal, restored on close."""

    def __init__(self, fd: int, deliver: Callable[[bytes], None], on_quit: Callable[[], None]) -> None:
        self.fd = fd
        self._deliver = deliver
        self._on_quit = on_quit
        self._saved = None
        self._escape = False
        if os.isatty(fd):
            self._saved = termios.tcgetattr(fd)
            tty.setraw(fd)
        os.set_blocking(fd, False)

    def on_readable(self) -> bool:
        """Forward what stdin has; False once it reached end of file."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return True
        if not data:
            return False
        if self._saved is not None:
            data = self._filter_escape(data)
        if data:
            self._deliver(data)
        return True

    def _filter_escape(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte == ESCAPE_QUIT:
                    self._on_quit()
                    return bytes(out)
                out.append(byte)
            elif byte == ESCAPE:
                self._escape = True
            else:
                out.append(byte)
        return bytes(out)

    def close(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        try:
            os.set_blocking(self.fd, True)
        except OSError:
            pass
