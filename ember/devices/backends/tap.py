"""TAP network devices, the host end of virtio-net (Linux Documentation/networking/tuntap.rst).

Opens /dev/net/tun and attaches to (or creates) a TAP interface with
IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte virtio_net_hdr_v1 in front of
every frame (VIRTIO 1.2 section 5.1.6), and offloads set with TUNSETOFFLOAD.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct

from ember.errors import ConfigError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq: a 16-byte name and a 24-byte union
IFREQ_FLAGS = struct.Struct(f"{IFNAMSIZ}sH")

# include/uapi/asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr
_IOC_WRITE = 1
_IOC_READ = 2
TUN_IOCTL_TYPE = ord("T")


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | TUN_IOCTL_TYPE << 8 | nr


_INT = ctypes.sizeof(ctypes.c_int)
_UINT = ctypes.sizeof(ctypes.c_uint)
TUNSETIFF = _ioc(_IOC_WRITE, 202, _INT)
TUNSETOFFLOAD = _ioc(_IOC_WRITE, 208, _UINT)
TUNSETVNETHDRSZ = _ioc(_IOC_WRITE, 216, _INT)

# include/uapi/linux/if_tun.h
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

# include/uapi/linux/sockios.h and if.h: bring the interface up.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (with num_buffers)


def _ifreq(name: str, flags: int) -> bytes:
    return IFREQ_FLAGS.pack(name.encode(), flags).ljust(IFREQ_SIZE, b"\0")


def _check_name(name: str) -> None:
    encoded = name.encode()
    if not 0 < len(encoded) < IFNAMSIZ or b"/" in encoded or b"\0" in encoded or name.strip() != name:
        raise ConfigError(f"bad TAP interface name {name!r} (1-15 characters, no '/' or spaces)")


def interface_exists(name: str) -> bool:
    """Whether an interface called `name` exists in this thread's network namespace."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def set_link_up(name: str) -> None:
    """IFF_UP on the interface, as `ip link set NAME up` does (SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        reply = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _ifreq(name, 0))
        flags = IFREQ_FLAGS.unpack_from(reply)[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _ifreq(name, flags | IFF_UP))


class Tap:
    """An open TAP queue: nonblocking frames, each led by a 12-byte vnet header."""

    def __init__(self, fd: int, name: str, created: bool) -> None:
        self.fd = fd
        self.name = name
        self.created = created  # Ember made it; the kernel removes it when we close

    @classmethod
    def open(cls, name: str) -> Tap:
        """Attach to TAP `name`, creating it (and bringing it up) if it does not exist."""
        _check_name(name)
        existed = interface_exists(name)
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open {TUN_DEVICE}: {exc.strerror}") from None
        try:
            cls._attach(fd, name)
            if not existed:
                set_link_up(name)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot set up TAP device {name}: {exc.strerror}") from None
        log.info("TAP %s %s", name, "attached" if existed else "created")
        return cls(fd, name, created=not existed)

    @staticmethod
    def _attach(fd: int, name: str) -> None:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)

    def set_offload(self, flags: int) -> None:
        """Which offloads the kernel may hand us (TUN_F_*): checksum, TSO."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def read_into(self, buffer: memoryview) -> int | None:
        """Read one frame (vnet header first); None when no frame is waiting."""
        try:
            return os.readv(self.fd, [buffer])
        except BlockingIOError:
            return None

    def writev(self, views: list[memoryview]) -> int:
        """Write one frame gathered from `views` (vnet header first)."""
        return os.writev(self.fd, views)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
