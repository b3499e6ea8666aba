"""The newc writer against GNU cpio: listings, extraction, modes, and fuzzed names."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.images.cpio import CpioArchive, normalize_path

CPIO = shutil.which("cpio")
pytestmark = pytest.mark.skipif(CPIO is None, reason="GNU cpio is not installed (apt-get install cpio)")


def cpio_list(data: bytes) -> list[str]:
    out = subprocess.run([CPIO, "-t", "--quiet"], input=data, capture_output=True, check=True)
    return out.stdout.decode().split("\n")[:-1]


def cpio_extract(data: bytes, dest: Path) -> None:
    subprocess.run([CPIO, "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=dest,
                   capture_output=True, check=True)


def sample() -> CpioArchive:
    arc = CpioArchive()
    arc.add_dir("/bin")
    arc.add_file("/bin/tool", b"\x7fELF" + bytes(range(256)) * 3, mode=0o755)
    arc.add_file("/etc/hostname", b"ember\n")
    arc.add_file("/empty", b"")
    arc.add_symlink("/sbin/init", "/init")
    arc.add_char_device("/dev/console", 5, 1)
    return arc


def test_listing_matches_entries_and_parents_come_first():
    names = cpio_list(sample().to_bytes())
    assert names == ["bin", "bin/tool", "etc", "etc/hostname", "empty", "sbin", "sbin/init", "dev", "dev/console"]


def test_extracts_identical_files_links_and_modes(tmp_path):
    cpio_extract(sample().to_bytes(), tmp_path)
    tool = tmp_path / "bin/tool"
    assert tool.read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "etc/hostname").stat().st_mode) == 0o644
    assert (tmp_path / "empty").read_bytes() == b""
    assert os.readlink(tmp_path / "sbin/init") == "/init"
    assert stat.S_ISDIR((tmp_path / "etc").stat().st_mode)


def test_char_device_header_fields():
    out = subprocess.run([CPIO, "-tv", "--quiet"], input=sample().to_bytes(), capture_output=True, check=True)
    line = next(row for row in out.stdout.decode().splitlines() if row.endswith("dev/console"))
    assert line.startswith("crw-------")
    assert "5,   1" in line or "5, 1" in line


def test_layout_is_aligned_and_ends_with_trailer():
    data = sample().to_bytes()
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    trailer = data.rindex(b"070701")
    assert data[trailer + 110:].rstrip(b"\0") == b"TRAILER!!!"
    inodes = {int(data[i + 6:i + 14], 16) for i in range(0, len(data)) if data.startswith(b"070701", i)}
    assert len(inodes) == len(sample()) + 1  # unique inode per entry, 0 for the trailer


def test_gzip_round_trip_is_deterministic():
    assert gzip.decompress(sample().to_gzip()) == sample().to_bytes()
    assert sample().to_gzip() == sample().to_gzip()


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "a\0b", "..", "TRAILER!!!"])
def test_rejects_bad_paths(bad):
    with pytest.raises(ValueError):
        CpioArchive().add_file(bad, b"x")


def test_rejects_duplicates_and_file_parents():
    arc = CpioArchive()
    arc.add_file("a", b"x")
    with pytest.raises(ValueError):
        arc.add_file("/a", b"y")
    with pytest.raises(ValueError):
        arc.add_file("a/b", b"y")
    with pytest.raises(ValueError):
        arc.add_char_device("c", -1, 0)
    with pytest.raises(ValueError):
        arc.add_file("d", b"", mode=0o100644)


def test_add_dir_is_idempotent():
    arc = CpioArchive()
    arc.add_dir("x")
    arc.add_dir("/x/")
    assert cpio_list(arc.to_bytes()) == ["x"]


name_part = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="/"),
                    min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.lists(name_part, min_size=1, max_size=3).map("/".join),
                             st.binary(max_size=300), min_size=1, max_size=6))
def test_fuzzed_names_and_contents_round_trip(files):
    arc = CpioArchive()
    kept: dict[str, bytes] = {}
    for path, data in files.items():
        try:
            arc.add_file(path, data)
        except ValueError:  # a file path that is another file's directory
            continue
        kept[normalize_path(path)] = data
    with tempfile.TemporaryDirectory() as tmp:
        cpio_extract(arc.to_bytes(), Path(tmp))
        for path, data in kept.items():
            assert (Path(tmp) / path).read_bytes() == data
    assert set(kept) <= set(cpio_list(arc.to_bytes()))
