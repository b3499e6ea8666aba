"""Initramfs writer: a cpio archive in the "newc" (SVR4, no CRC) format.

Follows the kernel's Documentation/driver-api/early-userspace/buffer-format.rst:
each entry is a 110-byte ASCII header ("070701" + 13 eight-digit hex fields),
the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes;
the archive ends with the entry "TRAILER!!!".
"""

from __future__ import annotations

import gzip
import posixpath
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
ALIGNMENT = 4
TRAILER_NAME = "TRAILER!!!"
FIELD_MAX = 0xFFFFFFFF
DEFAULT_DIR_MODE = 0o755
DEFAULT_FILE_MODE = 0o644
SYMLINK_MODE = 0o777
DEFAULT_DEVICE_MODE = 0o600
PERMISSION_BITS = 0o7777
GZIP_LEVEL = 9
FIRST_INODE = 1


@dataclass(frozen=True)
class CpioEntry:
    """One member of the archive: its name (no leading '/'), full mode and data."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad(length: int) -> bytes:
    """Zero bytes that bring ``length`` up to the next 4-byte boundary."""
    return b"\0" * (-length % ALIGNMENT)


def normalize_path(path: str) -> str:
    """Turn '/a//b/' into 'a/b'; reject empty names, NULs, '..' and the trailer's name."""
    if not isinstance(path, str) or "\0" in path:
        raise ValueError(f"invalid cpio path {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or parts == [TRAILER_NAME]:
        raise ValueError(f"invalid cpio path {path!r}")
    return "/".join(parts)


def _check_field(value: int, what: str) -> int:
    """Every numeric header field is 32 bits wide."""
    if not 0 <= value <= FIELD_MAX:
        raise ValueError(f"cpio {what} {value} does not fit in 32 bits")
    return value


def _check_permissions(mode: int) -> int:
    if not 0 <= mode <= PERMISSION_BITS:
        raise ValueError(f"mode {mode:#o} has bits outside permissions")
    return mode


class CpioArchive:
    """An in-memory newc archive; parent directories are added automatically.

    Entries keep the order they were added in (parents before children), which
    is the order the kernel unpacks them in. Timestamps are fixed (``mtime``)
    so that the same inputs give the same bytes.
    """

    def __init__(self, mtime: int = 0) -> None:
        self._entries: dict[str, CpioEntry] = {}
        self._mtime = _check_field(mtime, "mtime")

    def __contains__(self, path: str) -> bool:
        return normalize_path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CpioEntry]:
        """The entries in archive order, without the trailer."""
        return list(self._entries.values())

    def add_dir(self, path: str, mode: int = DEFAULT_DIR_MODE) -> None:
        """Add a directory (idempotent for an existing directory)."""
        name = normalize_path(path)
        existing = self._entries.get(name)
        if existing is not None and stat.S_ISDIR(existing.mode):
            return
        self._add(CpioEntry(name, stat.S_IFDIR | _check_permissions(mode)))

    def add_file(self, path: str, data: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
        """Add a regular file holding ``data``."""
        _check_field(len(data), "file size")
        entry = CpioEntry(normalize_path(path), stat.S_IFREG | _check_permissions(mode), bytes(data))
        self._add(entry)

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link whose body is ``target``."""
        if not target or "\0" in target:
            raise ValueError(f"invalid symlink target {target!r}")
        entry = CpioEntry(normalize_path(path), stat.S_IFLNK | SYMLINK_MODE, target.encode())
        self._add(entry)

    def add_char_device(self, path: str, major: int, minor: int, mode: int = DEFAULT_DEVICE_MODE) -> None:
        """Add a character device node (e.g. /dev/console is 5,1)."""
        entry = CpioEntry(
            normalize_path(path),
            stat.S_IFCHR | _check_permissions(mode),
            rdev_major=_check_field(major, "major"),
            rdev_minor=_check_field(minor, "minor"),
        )
        self._add(entry)

    def _add(self, entry: CpioEntry) -> None:
        if entry.name in self._entries:
            raise ValueError(f"duplicate cpio path {entry.name!r}")
        parent = posixpath.dirname(entry.name)
        if parent:
            self._ensure_parent(parent)
        self._entries[entry.name] = entry

    def _ensure_parent(self, parent: str) -> None:
        existing = self._entries.get(parent)
        if existing is None:
            self.add_dir(parent)
        elif not stat.S_ISDIR(existing.mode):
            raise ValueError(f"cpio parent {parent!r} is not a directory")

    def _header(self, entry: CpioEntry, ino: int) -> bytes:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, entry.uid, entry.gid, nlink, self._mtime, len(entry.data),
                  0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % _check_field(f, "field") for f in fields)
        return header + name + _pad(HEADER_SIZE + len(name))

    def to_bytes(self) -> bytes:
        """The whole archive, trailer included."""
        chunks: list[bytes] = []
        for ino, entry in enumerate(self._entries.values(), start=FIRST_INODE):
            chunks += [self._header(entry, ino), entry.data, _pad(len(entry.data))]
        chunks.append(self._header(CpioEntry(TRAILER_NAME, 0), 0))
        return b"".join(chunks)

    def to_gzip(self, level: int = GZIP_LEVEL) -> bytes:
        """The archive gzip-compressed, as the kernel's RD_GZIP initramfs expects."""
        return gzip.compress(self.to_bytes(), compresslevel=level, mtime=0)
