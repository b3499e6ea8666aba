"""Ember's artifact cache: where built guest images live and how they land there.

Follows the XDG Base Directory spec ($XDG_CACHE_HOME, default ~/.cache). Each
artifact set is built in a private temporary directory next to its final
place and published with one rename(2), so a killed build leaves nothing
half-written; a per-kind lock file (flock(2)) stops two builds racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ember.errors import EmberError

log = logging.getLogger(__name__)

APP_NAME = "ember"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
HASH_CHARS = 12
IN_RIG_ENV = "EMBER_IN_RIG"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/ember, or ~/.cache/ember (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / APP_NAME


def refuse_build_in_rig(final: Path) -> None:
    """Guest images are built on the host: inside the rig's emulated CPU a kernel build
    takes hours, so a miss there is a set-up error, reported at once."""
    if os.environ.get(IN_RIG_ENV) == "1":
        raise EmberError(f"{final} is not built, and building guest images inside the rig would take hours: "
                         "run 'ember images build' on the host (with the same HOME and XDG_CACHE_HOME)")


def short_hash(*parts: bytes) -> str:
    """A 12-hex-digit digest of ``parts`` (length-prefixed so parts can't blur)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:HASH_CHARS]


@contextlib.contextmanager
def locked(kind_dir: Path) -> Iterator[None]:
    """Hold the exclusive build lock of one artifact kind (e.g. cache/kernel)."""
    kind_dir.mkdir(parents=True, exist_ok=True)
    with open(kind_dir / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_stale_builds(kind_dir: Path) -> None:
    """Delete temporary dirs left by killed builds; call with the lock held."""
    for stale in kind_dir.glob(TMP_PREFIX + "*"):
        log.info("removing unfinished build %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield an empty dir to build into; on success rename it to ``final``."""
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + "-", dir=final.parent))
    try:
        out = tmp / "out"
        out.mkdir()
        yield out
        os.rename(out, final)
        log.info("published %s", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
