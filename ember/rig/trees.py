"""Read-only ext4 snapshots of the Python trees, attached to the rig as virtio-blk disks.

Every file lookup over virtio-9p is a round trip through emulated hardware, and
Python startup does hundreds; a snapshot of the interpreter prefix and the
virtualenv (mke2fs -d) serves them from the rig's own page cache instead. A
snapshot is keyed by the tree's path and its directories' mtimes, so pip
installs are picked up; the repository itself always stays live on 9p.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from ember.errors import EmberError
from ember.images.cache import locked
from ember.rig.kernel import rig_cache_dir

log = logging.getLogger(__name__)

SKIPPED_PREFIXES = (Path("/"), Path("/usr"), Path("/usr/local"))
INODE_SLACK = 1.2
BLOCK_SIZE = 4096
SIZE_SLACK = 1.25
SIZE_EXTRA = 64 << 20
KEY_CHARS = 16
ENABLE_ENV = "EMBER_RIG_SNAPSHOTS"


def python_trees() -> list[Path]:
    """The interpreter prefix and the virtualenv, when they are dedicated trees.

    Opt-in (EMBER_RIG_SNAPSHOTS=1): on a loaded 2-core host the gain was within
    the noise, and the images cost a one-off mke2fs and disk the size of the trees.
    """
    if os.environ.get(ENABLE_ENV) != "1":
        return []
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    return sorted(r for r in roots if r.is_dir() and r not in SKIPPED_PREFIXES)


def survey(root: Path) -> tuple[str, int, int]:
    """(fingerprint, bytes, inodes) of the tree: the directories' mtimes identify its content."""
    digest = hashlib.sha256(str(root).encode())
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        digest.update(f"{dirpath}\0{os.stat(dirpath).st_mtime_ns}\0".encode())
        inodes += 1 + len(filenames)
        for name in filenames:
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            size += (info.st_size + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
        inodes += sum(1 for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
    return digest.hexdigest()[:KEY_CHARS], size, inodes


def _mke2fs(root: Path, image: Path, size: int, inodes: int) -> None:
    blocks = int(size * SIZE_SLACK + SIZE_EXTRA) // BLOCK_SIZE
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-N", str(int(inodes * INODE_SLACK) + 1024),
            "-O", "^has_journal,^metadata_csum", "-E", "root_owner=0:0", "-d", str(root), str(image), str(blocks)]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise EmberError("the rig needs mke2fs for its Python snapshots (apt-get install e2fsprogs)") from exc
    except subprocess.CalledProcessError as exc:
        raise EmberError(f"mke2fs could not snapshot {root}: {exc.stderr.strip()[-200:]}") from exc


def snapshot(root: Path) -> Path:
    """The cached ext4 image of ``root``, made (and older ones of it removed) when it changed."""
    key, size, inodes = survey(root)
    kind_dir = rig_cache_dir() / "trees"
    path_key = hashlib.sha256(str(root).encode()).hexdigest()[:KEY_CHARS]
    image = kind_dir / f"{path_key}-{key}.ext4"
    if image.exists():
        return image
    with locked(kind_dir):
        if not image.exists():
            log.info("snapshotting %s for the rig (%d MiB)", root, size >> 20)
            tmp = image.with_suffix(".tmp")
            _mke2fs(root, tmp, size, inodes)
            tmp.replace(image)
            for old in kind_dir.glob(f"{path_key}-*.ext4"):
                if old != image:
                    old.unlink(missing_ok=True)
    return image


def snapshots(roots: list[Path] | None = None) -> list[tuple[Path, Path]]:
    """(tree, image) pairs for the rig to mount read-only over those paths."""
    return [(root, snapshot(root)) for root in (python_trees() if roots is None else roots)]
