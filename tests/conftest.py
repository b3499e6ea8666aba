"""Test tiers by directory: tests/kvm -> kvm, tests/system and tests/rig -> system.

The system tier runs directly where the local KVM boots stock Linux, else whole
inside one rig boot (see ember/rig/pytest_tiers.py); EMBER_SYSTEM=direct|rig|skip
forces a mode, and every skip states its reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.rig.pytest_tiers import modify_items

TESTS_ROOT = Path(__file__).resolve().parent


def _build_guest_images() -> None:
    """Build (or reuse) the guest images on the host, before the rig starts."""
    from ember.images import build_all

    build_all(progress=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    modify_items(config, items, TESTS_ROOT, prepare=_build_guest_images)
