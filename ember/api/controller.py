"""The VMM controller behind the API: the pending configuration and the started microVM.

Implements the semantics of Firecracker's ``rpc_interface`` (pre-boot and
runtime controllers): pre-boot calls edit a copy of the pending ``VmConfig``
and are refused after ``InstanceStart``; runtime calls need a started VM. A
request is checked completely before anything changes, and one lock
serializes every call, so a failed or concurrent request never leaves a
half-applied configuration.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Callable, Protocol

import msgspec

from ember import __version__
from ember import config as cfg
from ember.api import models
from ember.api.faults import (EMPTY_ID, ID_MISMATCH, INVALID_ID, METRICS_REINIT, NO_KERNEL,
                              NOT_AFTER_START, NOT_BEFORE_START, ROOT_EXISTS, ApiError,
                              bad_json, not_supported)
from ember.api.logs import DEFAULT_INSTANCE_ID, LogSetup
from ember.api.metrics import ApiCounters, MetricsSink, utc_timestamp_ms
from ember.errors import EmberError

log = logging.getLogger(__name__)

APP_NAME = "Ember"
# The Firecracker API release whose paths and bodies Ember serves.
FIRECRACKER_API_VERSION = "1.10.0"
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_NO_TEMPLATE = (None, "None")
_STOP_WAIT_S = 5.0
# Metrics groups Firecracker keeps at the top level; other machine counters go under "vmm".
_TOP_LEVEL_GROUPS = {"uart", "block", "net", "vsock", "entropy", "balloon", "i8042", "rtc"}
_PER_DEVICE_PREFIXES = ("block_", "net_")  # block_<drive id>, net_<iface id>


def _top_level(group: str) -> bool:
    return group in _TOP_LEVEL_GROUPS or group.startswith(_PER_DEVICE_PREFIXES)


class Machine(Protocol):
    """What the controller needs of ``ember.machine.MicroVM``."""

    state: str

    def start(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def send_ctrl_alt_del(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> Any: ...
    def metrics(self) -> dict: ...


MachineFactory = Callable[[cfg.VmConfig], Machine]


def default_machine_factory(console: str = "stdio") -> MachineFactory:
    """Build real microVMs. Call it on the main thread: importing ember.machine
    installs the vCPU kick signal handler, which only the main thread may do."""
    from ember.machine import MicroVM

    def build(config: cfg.VmConfig) -> Machine:
        return MicroVM(config, console=console)

    return build


def _lazy_machine_factory(config: cfg.VmConfig) -> Machine:
    """The default when none is given: imports ember.machine on first start."""
    return default_machine_factory()(config)


def checked_id(resource_id: str | None) -> str:
    """Firecracker's ``checked_id``: non-empty, alphanumerics and underscores."""
    if not resource_id:
        raise ApiError(EMPTY_ID)
    if not all(c == "_" or c.isalnum() for c in resource_id):
        raise ApiError(INVALID_ID)
    return resource_id


def decode(body: bytes, model: type) -> Any:
    """Parse a request body; any problem is a 400 with Firecracker's wording."""
    try:
        return msgspec.json.decode(body, type=model)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise bad_json(str(err)) from None


def copy_config(config: cfg.VmConfig) -> cfg.VmConfig:
    """A deep copy, so nobody shares mutable state with the pending config."""
    return msgspec.json.decode(msgspec.json.encode(config), type=cfg.VmConfig)


def full_dict(value: Any) -> Any:
    """A struct as plain data with every field, defaults included."""
    if isinstance(value, msgspec.Struct):
        return {f.encode_name: full_dict(getattr(value, f.name)) for f in msgspec.structs.fields(value)}
    if isinstance(value, list):
        return [full_dict(item) for item in value]
    return value


class VmmController:
    """Every API operation; thread-safe; reused by the CLI for ``--config-file``."""

    def __init__(self, *, instance_id: str = DEFAULT_INSTANCE_ID,
                 machine_factory: MachineFactory | None = None,
                 logs: LogSetup | None = None) -> None:
        self.instance_id = instance_id
        self._factory = machine_factory or _lazy_machine_factory
        self._lock = threading.RLock()
        self._config = cfg.VmConfig()
        self._vm: Machine | None = None
        self.started = threading.Event()
        self.logs = logs or LogSetup(instance_id)
        self.counters = ApiCounters()
        self.api_server_metrics: dict[str, int] = {}
        self.metrics = MetricsSink(self.collect_metrics)
        self._flushed: dict[str, dict[str, int]] = {}  # device counters as of the last metrics line

    # ---- queries ---------------------------------------------------------
    @property
    def vm(self) -> Machine | None:
        return self._vm

    def describe_instance(self) -> dict:
        state = self._vm.state if self._vm is not None else "Not started"
        info = models.InstanceInfo(app_name=APP_NAME, id=self.instance_id, state=state,
                                   vmm_version=__version__)
        return msgspec.to_builtins(info)

    def version(self) -> dict:
        return {"firecracker_version": FIRECRACKER_API_VERSION}

    def get_machine_config(self) -> dict:
        with self._lock:
            return full_dict(self._config.machine_config)

    def get_vm_config(self) -> dict:
        """Firecracker's FullVmConfiguration: every section Ember has, null when absent."""
        with self._lock:
            c = self._config
            return {
                "boot-source": full_dict(c.boot_source),
                "machine-config": full_dict(c.machine_config),
                "drives": full_dict(c.drives),
                "network-interfaces": full_dict(c.network_interfaces),
                "vsock": full_dict(c.vsock),
                "entropy": full_dict(c.entropy),
                "logger": full_dict(c.logger),
                "metrics": full_dict(c.metrics),
            }

    # ---- pre-boot configuration -----------------------------------------
    def put_boot_source(self, body: bytes) -> None:
        source = decode(body, cfg.BootSource)
        with self._lock:
            self._require_not_started()
            _check_readable(source.kernel_image_path, "The kernel file cannot be opened")
            if source.initrd_path:
                _check_readable(source.initrd_path, "The initrd file cannot be opened")
            self._config.boot_source = source

    def put_machine_config(self, body: bytes) -> None:
        given = decode(body, models.MachineConfigPut)
        machine = cfg.MachineConfig(**msgspec.structs.asdict(given))
        with self._lock:
            self._require_not_started()
            _check_machine(machine)
            self._config.machine_config = machine

    def patch_machine_config(self, body: bytes) -> None:
        patch = decode(body, models.MachineConfigPatch)
        changes = {k: v for k, v in msgspec.structs.asdict(patch).items() if v is not None}
        with self._lock:
            self._require_not_started()
            machine = msgspec.structs.replace(self._config.machine_config, **changes)
            _check_machine(machine)
            self._config.machine_config = machine

    def put_drive(self, drive_id: str | None, body: bytes) -> None:
        drive_id = checked_id(drive_id)
        drive = decode(body, cfg.Drive)
        _require_same_id(drive_id, drive.drive_id)
        with self._lock:
            self._require_not_started()
            drives = _replace_by_id(self._config.drives, "drive_id", drive)
            if sum(d.is_root_device for d in drives) > 1:
                raise ApiError(ROOT_EXISTS)
            _check_drive_file(drive.path_on_host, drive.is_read_only)
            self._config.drives = drives

    def put_network_interface(self, iface_id: str | None, body: bytes) -> None:
        iface_id = checked_id(iface_id)
        iface = decode(body, cfg.NetworkInterface)
        _require_same_id(iface_id, iface.iface_id)
        with self._lock:
            self._require_not_started()
            ifaces = _replace_by_id(self._config.network_interfaces, "iface_id", iface)
            _check_interfaces(ifaces, iface)
            self._config.network_interfaces = ifaces

    def put_vsock(self, body: bytes) -> None:
        vsock = decode(body, cfg.Vsock)
        with self._lock:
            self._require_not_started()
            self._config.vsock = vsock

    def put_entropy(self, body: bytes) -> None:
        entropy = decode(body, cfg.Entropy)
        with self._lock:
            self._require_not_started()
            self._config.entropy = entropy

    def put_logger(self, body: bytes) -> None:
        logger = decode(body, cfg.Logger)
        with self._lock:
            self._require_not_started()
            self._apply_logger(logger)

    def put_metrics(self, body: bytes) -> None:
        metrics = decode(body, cfg.Metrics)
        with self._lock:
            self._require_not_started()
            self._apply_metrics(metrics)

    def configure(self, config: cfg.VmConfig) -> None:
        """Apply a whole ``--config-file`` configuration, all or nothing."""
        with self._lock:
            self._require_not_started()
            _check_whole(config)
            if config.logger is not None:
                self._apply_logger(config.logger)
            if config.metrics is not None:
                self._apply_metrics(config.metrics)
            self._config = copy_config(config)

    # ---- runtime ------------------------------------------------------------
    def patch_drive(self, drive_id: str | None, body: bytes) -> None:
        drive_id = checked_id(drive_id)
        patch = decode(body, models.DrivePatch)
        _require_same_id(drive_id, patch.drive_id)
        with self._lock:
            vm = self._require_started()
            drive = _find(self._config.drives, "drive_id", drive_id, "Invalid block device ID")
            if patch.path_on_host is not None:
                self._change_media(vm, drive, patch.path_on_host)
            if patch.rate_limiter is not None:
                drive.rate_limiter = self._limit(vm, f"block:{drive_id}", 0, drive.rate_limiter, patch.rate_limiter)

    def patch_network_interface(self, iface_id: str | None, body: bytes) -> None:
        iface_id = checked_id(iface_id)
        patch = decode(body, models.NetworkInterfacePatch)
        _require_same_id(iface_id, patch.iface_id)
        with self._lock:
            vm = self._require_started()
            iface = _find(self._config.network_interfaces, "iface_id", iface_id,
                          "Invalid network interface ID")
            name = f"net:{iface_id}"
            if patch.rx_rate_limiter is not None:
                iface.rx_rate_limiter = self._limit(vm, name, 0, iface.rx_rate_limiter, patch.rx_rate_limiter)
            if patch.tx_rate_limiter is not None:
                iface.tx_rate_limiter = self._limit(vm, name, 1, iface.tx_rate_limiter, patch.tx_rate_limiter)

    def action(self, body: bytes) -> None:
        kind = decode(body, models.InstanceAction).action_type
        if kind == "InstanceStart":
            self.start()
        elif kind == "SendCtrlAltDel":
            with self._lock:
                _run(self._require_started().send_ctrl_alt_del)
        else:
            self.metrics.flush()

    def patch_vm(self, body: bytes) -> None:
        state = decode(body, models.VmStateUpdate).state
        with self._lock:
            vm = self._require_started()
            _run(vm.pause if state == "Paused" else vm.resume)
            log.info("microVM state set to %s", state)

    def start(self) -> None:
        """InstanceStart: build and boot the microVM from the pending config."""
        with self._lock:
            self._require_not_started()
            if self._config.boot_source is None:
                raise ApiError(NO_KERNEL)
            config = copy_config(self._config)
            _run(cfg.validate, config)
            vm = _run(self._factory, config)
            try:
                vm.start()
            except EmberError as err:
                _stop_quietly(vm)
                raise ApiError(f"Start microvm error: {err}") from None
            self._vm = vm
            self.started.set()
            log.info("microVM started")

    def shutdown(self) -> None:
        """Stop the VM (if any) and close the logs and metrics targets."""
        vm = self._vm
        if vm is not None and vm.state != "Exited":
            _stop_quietly(vm)
            vm.wait(timeout=_STOP_WAIT_S)
        self.metrics.close()

    # ---- metrics ------------------------------------------------------------
    def collect_metrics(self) -> dict:
        """One metrics object: API counters, logger losses and the machine's counters.

        The device groups Firecracker keeps at the top level count, as there, what
        happened since the previous line; the rest of the machine's counters (under
        ``vmm``) are totals since the start."""
        data: dict[str, Any] = {"utc_timestamp_ms": utc_timestamp_ms()}
        data.update(self.counters.take())
        data["api_server"] = dict(self.api_server_metrics)
        data["logger"] = {"missed_log_count": self.logs.missed}
        vm = self._vm
        if vm is not None:
            vmm = data.setdefault("vmm", {})
            for key, value in vm.metrics().items():
                if _top_level(key):
                    data[key] = self._since_last_line(key, value)
                else:
                    vmm[key] = value
        return data

    def _since_last_line(self, group: str, totals: dict[str, int]) -> dict[str, int]:
        last = self._flushed.get(group, {})
        self._flushed[group] = dict(totals)
        return {key: value - last.get(key, 0) for key, value in totals.items()}

    # ---- helpers --------------------------------------------------------------
    def _require_not_started(self) -> None:
        if self._vm is not None:
            raise ApiError(NOT_AFTER_START)

    def _require_started(self) -> Machine:
        if self._vm is None:
            raise ApiError(NOT_BEFORE_START)
        return self._vm

    def _apply_logger(self, logger: cfg.Logger) -> None:
        if logger.module:
            log.warning("logger module filter %r is accepted but not applied", logger.module)
        _run(self.logs.configure, logger.log_path, logger.level, logger.show_level, logger.show_log_origin)
        self._config.logger = logger

    def _apply_metrics(self, metrics: cfg.Metrics) -> None:
        if self.metrics.configured:
            raise ApiError(METRICS_REINIT)
        _run(self.metrics.configure, metrics.metrics_path)
        self._config.metrics = metrics

    @staticmethod
    def _limit(vm: Machine, device: str, queue: int, old: cfg.RateLimiter | None,
               patch: cfg.RateLimiter) -> cfg.RateLimiter:
        """Firecracker's rate limiter update: a bucket given replaces the old one (size 0
        lifts it), a bucket left out stays. Applied to the running device, then kept."""
        merged = cfg.RateLimiter(
            bandwidth=patch.bandwidth if patch.bandwidth is not None else (old.bandwidth if old else None),
            ops=patch.ops if patch.ops is not None else (old.ops if old else None))
        apply = getattr(vm, "set_rate_limiter", None)
        if apply is not None:
            _run(apply, device, queue, merged)
        return merged

    def _change_media(self, vm: Machine, drive: cfg.Drive, path: str) -> None:
        update = getattr(vm, "update_drive", None)
        if update is None:
            raise not_supported("changing a drive's backing file after boot")
        _check_drive_file(path, drive.is_read_only)
        _run(update, drive.drive_id, path)
        drive.path_on_host = path


def _run(func: Callable, *args: Any) -> Any:
    """Call into the machine or config layer; its one-line errors become 400s."""
    try:
        return func(*args)
    except ApiError:
        raise
    except EmberError as err:
        raise ApiError(str(err)) from None


def _stop_quietly(vm: Machine) -> None:
    try:
        vm.stop()
    except Exception:  # the VM is being abandoned; its failure is already reported
        log.debug("stopping the microVM failed", exc_info=True)


def _require_same_id(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise ApiError(ID_MISMATCH)


def _replace_by_id(items: list, key: str, new: Any) -> list:
    """A new list with ``new`` in place of the item with the same id, else appended."""
    ident = getattr(new, key)
    out = [new if getattr(item, key) == ident else item for item in items]
    if not any(getattr(item, key) == ident for item in items):
        out.append(new)
    return out


def _find(items: list, key: str, ident: str, what: str) -> Any:
    for item in items:
        if getattr(item, key) == ident:
            return item
    raise ApiError(f"{what}: {ident} not found.")


def _check_readable(path: str, what: str) -> None:
    """The file opens for reading and is not a directory."""
    if os.path.isdir(path):
        raise ApiError(f"{what}: Is a directory: {path}")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as err:
        raise ApiError(f"{what}: {err.strerror}: {path}") from None
    except ValueError:  # an embedded NUL byte
        raise ApiError(f"{what}: invalid path") from None


def _check_drive_file(path: str, read_only: bool) -> None:
    """Firecracker opens the backing file at PUT time, read-write unless read-only."""
    what = "Unable to open the block device backing file"
    _check_readable(path, what)
    if not read_only and not os.access(path, os.W_OK):
        raise ApiError(f"{what}: Permission denied (not writable): {path}")


def _check_machine(machine: cfg.MachineConfig) -> None:
    if machine.smt and machine.vcpu_count > 1 and machine.vcpu_count % 2:
        raise ApiError("The vCPU number is invalid! The vCPU number can only be 1 or an even "
                       "number when SMT is enabled.")
    if machine.huge_pages == "2M" and machine.mem_size_mib % 2:
        raise ApiError("The memory size (MiB) is either 0, or not a multiple of the configured page size.")
    if machine.cpu_template not in _NO_TEMPLATE:
        raise not_supported(f"CPU template {machine.cpu_template!r}")


def _check_interfaces(ifaces: list[cfg.NetworkInterface], new: cfg.NetworkInterface) -> None:
    if new.guest_mac is not None and not _MAC.match(new.guest_mac):
        raise ApiError(f"Invalid MAC address: {new.guest_mac}")
    others = [i for i in ifaces if i.iface_id != new.iface_id]
    if any(i.host_dev_name == new.host_dev_name for i in others):
        raise ApiError(f"The host device name {new.host_dev_name} is already in use.")
    if new.guest_mac and any((i.guest_mac or "").lower() == new.guest_mac.lower() for i in others):
        raise ApiError(f"The MAC address is already in use: {new.guest_mac}")


def _check_whole(config: cfg.VmConfig) -> None:
    """The checks the individual PUTs make, for a whole configuration at once."""
    if config.boot_source is not None:
        _check_readable(config.boot_source.kernel_image_path, "The kernel file cannot be opened")
        if config.boot_source.initrd_path:
            _check_readable(config.boot_source.initrd_path, "The initrd file cannot be opened")
    _check_machine(config.machine_config)
    for drive in config.drives:
        checked_id(drive.drive_id)
        _check_drive_file(drive.path_on_host, drive.is_read_only)
    if sum(d.is_root_device for d in config.drives) > 1:
        raise ApiError(ROOT_EXISTS)
    for index, iface in enumerate(config.network_interfaces):
        _check_interfaces(config.network_interfaces[: index + 1], iface)
    _run(cfg.validate, config)
