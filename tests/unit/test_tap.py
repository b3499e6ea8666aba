"""The TAP backend: ioctl numbers, name checks, and real TAPs in a private network namespace."""

from __future__ import annotations

import fcntl
import socket
import subprocess

import pytest

from ember.devices.backends import tap as tapmod
from ember.devices.backends.tap import Tap
from ember.errors import ConfigError
from tests.unit.test_virtio_net import in_new_netns, netns_available

needs_netns = pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))


def test_ioctl_numbers_match_linux_if_tun_h():
    assert tapmod.TUNSETIFF == 0x400454CA
    assert tapmod.TUNSETOFFLOAD == 0x400454D0
    assert tapmod.TUNSETVNETHDRSZ == 0x400454D8


@pytest.mark.parametrize("name", ["", "a" * 16, "bad/name", " lead", "nul\0"])
def test_bad_names_are_config_errors(name):
    with pytest.raises(ConfigError):
        Tap.open(name)


def _link_flags(name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        reply = fcntl.ioctl(sock.fileno(), tapmod.SIOCGIFFLAGS, tapmod._ifreq(name, 0))
    return tapmod.IFREQ_FLAGS.unpack_from(reply)[1]


@needs_netns
def test_creates_a_missing_tap_and_brings_it_up():
    def body():
        tap = Tap.open("embert1")
        try:
            return tap.created, tapmod.interface_exists("embert1"), _link_flags("embert1") & tapmod.IFF_UP
        finally:
            tap.close()

    created, exists, up = in_new_netns(body)
    assert created and exists and up


@needs_netns
def test_attaches_to_an_existing_tap_and_sets_offloads():
    def body():
        subprocess.run(["ip", "tuntap", "add", "dev", "embert2", "mode", "tap", "vnet_hdr"], check=True)
        tap = Tap.open("embert2")
        try:
            tap.set_offload(tapmod.TUN_F_CSUM | tapmod.TUN_F_TSO4)
            return tap.created
        finally:
            tap.close()

    # `ip` runs as a child of the thread that unshared, so it sees the same namespace.
    assert in_new_netns(body) is False


@needs_netns
def test_read_on_an_idle_tap_returns_none():
    def body():
        tap = Tap.open("embert3")
        try:
            return tap.read_into(memoryview(bytearray(2048)))
        finally:
            tap.close()

    assert in_new_netns(body) is None
