"""Request and response bodies of the API that ``ember.config`` does not define.

Partial updates (Firecracker's ``PartialDrive``, ``PartialNetworkInterface``,
PATCH ``/machine-config``), actions, the VM state, instance info and faults,
named and shaped as in Firecracker's swagger description.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ember.config import MAX_VCPUS, MIN_MEM_MIB, MachineConfig, RateLimiter


class _Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every request body: unknown fields are errors."""


class MachineConfigPut(MachineConfig, kw_only=True):
    """PUT /machine-config: vcpu_count and mem_size_mib are required (swagger)."""

    vcpu_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS)]
    mem_size_mib: Annotated[int, msgspec.Meta(ge=MIN_MEM_MIB)]


class MachineConfigPatch(_Body):
    """PATCH /machine-config: only the fields given change."""

    vcpu_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS)] | None = None
    mem_size_mib: Annotated[int, msgspec.Meta(ge=MIN_MEM_MIB)] | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: str | None = None
    huge_pages: Literal["None", "2M"] | None = None


class DrivePatch(_Body):
    """PATCH /drives/{id} (Firecracker's PartialDrive): post-boot media change."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterfacePatch(_Body):
    """PATCH /network-interfaces/{id} (PartialNetworkInterface): rate limiters."""

    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class InstanceAction(_Body):
    """PUT /actions (InstanceActionInfo)."""

    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class VmStateUpdate(_Body):
    """PATCH /vm (Vm): pause or resume the guest."""

    state: Literal["Paused", "Resumed"]


class InstanceInfo(msgspec.Struct):
    """GET / : who and where this VMM is."""

    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused", "Exited"]
    vmm_version: str


class FirecrackerVersion(msgspec.Struct):
    """GET /version."""

    firecracker_version: str


class Fault(msgspec.Struct):
    """The body of every 4xx answer (Firecracker's Error)."""

    fault_message: str
