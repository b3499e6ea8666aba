"""The rig's KVM keeper (ember/rig/kvm_keeper.py) holds a VM open until it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.guests import KVM_SKIP_REASON, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]


def _kvm_fds(pid: int) -> list[str]:
    fds = f"/proc/{pid}/fd"
    links = []
    for name in os.listdir(fds):
        try:
            links.append(os.readlink(f"{fds}/{name}"))
        except OSError:
            pass
    return [link for link in links if "kvm" in link]


def test_the_keeper_holds_a_vm_and_a_vcpu_until_killed():
    proc = subprocess.Popen([sys.executable, "-m", "ember.rig.kvm_keeper"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "anon_inode:kvm-vcpu:0" not in _kvm_fds(proc.pid):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert {"anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0"} <= set(_kvm_fds(proc.pid))
        time.sleep(0.5)
        assert proc.poll() is None  # still holding
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
