"""The guest kernel builder: config parsing, cache keys, and the real build's .config.

test_built_config_* BUILD THE KERNEL (about 5 minutes on 2 cores the first
time, a cache hit afterwards). They belong to the unit tier on purpose: if the
build cannot run (missing linux-source-6.1 or tools) they FAIL, never skip.
"""

from __future__ import annotations

import pytest

from ember.errors import EmberError
from ember.images import artifact_path, kernel
from ember.images.kernel import build_kernel, config_mismatches, fragment_text, parse_config

BZIMAGE_MAGIC_OFFSET = 0x202
BZIMAGE_MAGIC = b"HdrS"
ELF_MAGIC = b"\x7fELF"


def test_parse_config_reads_set_unset_and_strings():
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n# comment\nCONFIG_N=64\n'
    assert parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_N": "64"}


def test_mismatches_report_dropped_and_wrong_values():
    required = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_D": "n"}
    actual = {"CONFIG_A": "y", "CONFIG_B": "y"}
    assert config_mismatches(required, actual) == {"CONFIG_B": ("n", "y"), "CONFIG_C": ("y", "n")}


def test_fragment_has_the_microvm_essentials():
    frag = parse_config(fragment_text())
    for opt in ("SERIAL_8250_CONSOLE", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_BLK", "VIRTIO_NET",
                "VIRTIO_VSOCKETS", "KVM_GUEST", "X86_MPPARSE", "DEVMEM", "BLK_DEV_INITRD", "RD_GZIP",
                "EXT4_FS", "DEVTMPFS", "UNIX98_PTYS", "BINFMT_SCRIPT"):
        assert frag["CONFIG_" + opt] == "y", opt
    for opt in ("ACPI", "PCI", "MODULES"):
        assert frag["CONFIG_" + opt] == "n", opt


def test_cache_key_follows_the_fragment(monkeypatch):
    before = kernel.kernel_key()
    assert before.startswith(kernel.source_version())
    monkeypatch.setattr(kernel, "fragment_text", lambda: fragment_text() + "CONFIG_X=y\n")
    assert kernel.kernel_key() != before


def test_missing_source_names_the_package(tmp_path):
    with pytest.raises(EmberError, match="apt-get install linux-source-6.1"):
        build_kernel(progress=False, tarball=tmp_path / "linux-source-6.1.tar.xz")


@pytest.mark.timeout(3600)
def test_no_guest_image_is_built_inside_the_rig(tmp_path, monkeypatch):
    """A miss inside the rig is a set-up error at once, not hours of emulated compiling."""
    from ember.images import build_rootfs

    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"not really a tarball")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("EMBER_IN_RIG", "1")
    for build in (lambda: build_kernel(progress=False, tarball=tarball), lambda: build_rootfs(progress=False)):
        with pytest.raises(EmberError, match="run 'ember images build' on the host"):
            build()
    assert not (tmp_path / "empty-cache").exists()


def test_built_config_has_every_fragment_option():
    """Builds the real kernel (cached) and checks nothing in the fragment was dropped."""
    built = build_kernel(progress=False)
    required = parse_config(fragment_text())
    actual = parse_config(built["config"].read_text())
    assert len(required) > 50
    assert config_mismatches(required, actual) == {}


@pytest.mark.timeout(3600)
def test_built_images_are_a_bzimage_and_an_elf():
    kernel_path = artifact_path("kernel", progress=False)
    assert kernel_path.read_bytes()[BZIMAGE_MAGIC_OFFSET:BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC
    assert artifact_path("vmlinux", progress=False).read_bytes()[:4] == ELF_MAGIC
    assert artifact_path("kernel", build=False) == kernel_path
