"""Fixtures of the system tier (real Linux guests under hardware-style KVM).

These tests run where the local KVM boots stock Linux: directly on such a host,
or inside the rig (EMBER_IN_RIG=1), where the host already built the images.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def guest_images() -> dict[str, Path]:
    """The default guest kernel and root file system: {'kernel', 'vmlinux', 'initrd', 'rootfs', ...}."""
    from ember.images import build_all

    return build_all(progress=False)
