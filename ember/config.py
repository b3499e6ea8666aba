"""Machine configuration: one set of typed structures for CLI, API, files and snapshots.

The structures and field names follow Firecracker's API (``/boot-source``,
``/machine-config``, ``/drives/{id}``, ... and its ``--config-file`` JSON), so
Firecracker clients and config files work unchanged. msgspec checks types and
ranges at the edge; ``validate()`` checks what types cannot (files, limits).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import msgspec

from ember.errors import ConfigError

MAX_VCPUS = 32
MIN_MEM_MIB = 16
DEFAULT_MEM_MIB = 256
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=-1 quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

_ID = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{1,64}$")]
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class _Model(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every configuration structure: unknown fields are errors."""


class BootSource(_Model):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class MachineConfig(_Model):
    vcpu_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS)] = 1
    mem_size_mib: Annotated[int, msgspec.Meta(ge=MIN_MEM_MIB)] = DEFAULT_MEM_MIB
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: str | None = None
    huge_pages: Literal["None", "2M"] = "None"


class TokenBucket(_Model):
    """Firecracker's TokenBucket: ``size`` tokens, refilled from empty in ``refill_time`` ms;
    ``one_time_burst`` extra tokens at the start. Size or refill time 0: no limit."""

    size: Annotated[int, msgspec.Meta(ge=0)]
    refill_time: Annotated[int, msgspec.Meta(ge=0)]
    one_time_burst: Annotated[int, msgspec.Meta(ge=0)] | None = None


class RateLimiter(_Model):
    """Firecracker's RateLimiter: ``bandwidth`` counts bytes, ``ops`` counts requests."""

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class Drive(_Model):
    drive_id: _ID
    path_on_host: str
    is_root_device: bool
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    io_engine: Literal["Sync", "Async"] = "Sync"
    rate_limiter: RateLimiter | None = None


class NetworkInterface(_Model):
    iface_id: _ID
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(_Model):
    guest_cid: Annotated[int, msgspec.Meta(ge=3, le=0xFFFFFFFF)]
    uds_path: str
    vsock_id: str | None = None


class Entropy(_Model):
    rate_limiter: RateLimiter | None = None


class Logger(_Model):
    log_path: str | None = None
    level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] = "Info"
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None


class Metrics(_Model):
    metrics_path: str


class VmConfig(_Model, rename={
    "boot_source": "boot-source",
    "machine_config": "machine-config",
    "network_interfaces": "network-interfaces",
}):
    """A whole microVM, in the shape of Firecracker's ``--config-file`` JSON."""

    boot_source: BootSource | None = None
    machine_config: MachineConfig = msgspec.field(default_factory=MachineConfig)
    drives: list[Drive] = msgspec.field(default_factory=list)
    network_interfaces: list[NetworkInterface] = msgspec.field(default_factory=list)
    vsock: Vsock | None = None
    entropy: Entropy | None = None
    logger: Logger | None = None
    metrics: Metrics | None = None


def decode(data: bytes | str, model: type[msgspec.Struct]):
    """Parse JSON into ``model``; any problem becomes a one-line ConfigError."""
    try:
        return msgspec.json.decode(data, type=model)
    except msgspec.ValidationError as err:
        raise ConfigError(f"invalid {_name(model)}: {err}") from None
    except msgspec.DecodeError as err:
        raise ConfigError(f"malformed JSON: {err}") from None


def load_file(path: str) -> VmConfig:
    """Read a Firecracker-style JSON configuration file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    return decode(data, VmConfig)


def validate(config: VmConfig) -> None:
    """Check what types cannot: files exist, ids are unique, one root drive."""
    if config.boot_source is None:
        raise ConfigError("no boot source: a kernel image is required")
    _need_file(config.boot_source.kernel_image_path, "kernel image")
    if config.boot_source.initrd_path:
        _need_file(config.boot_source.initrd_path, "initrd")
    _unique([d.drive_id for d in config.drives], "drive")
    if sum(d.is_root_device for d in config.drives) > 1:
        raise ConfigError("more than one drive is marked as the root device")
    for drive in config.drives:
        _need_file(drive.path_on_host, f"drive {drive.drive_id} image")
    _unique([n.iface_id for n in config.network_interfaces], "network interface")
    for iface in config.network_interfaces:
        if iface.guest_mac is not None and not _MAC.match(iface.guest_mac):
            raise ConfigError(f"invalid MAC address for {iface.iface_id}: {iface.guest_mac!r}")


def _need_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{what} not found: {path}")
    if not os.path.isfile(path) and not path.startswith("/dev/"):
        raise ConfigError(f"{what} is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} is not readable: {path}")


def _unique(ids: list[str], what: str) -> None:
    seen: set[str] = set()
    for ident in ids:
        if ident in seen:
            raise ConfigError(f"duplicate {what} id: {ident}")
        seen.add(ident)


def _name(model: type) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", model.__name__).lower()
