"""Ember's OpenAPI 3.1 description of the API it serves, generated from the msgspec models.

The schemas come from ``msgspec.json.schema_components`` over the same types
the server decodes with, so the description cannot drift from the code; the
generated ``openapi.json`` ships beside this module and is served at
``GET /openapi.json``. Regenerate with ``python -m ember.api.openapi``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache

import msgspec

from ember import __version__
from ember import config as cfg
from ember.api import models

SPEC_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
_REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    body: type | None = None
    answer: type | None = None


OPERATIONS = [
    Operation("get", "/", "describeInstance", "Returns general information about an instance.",
              answer=models.InstanceInfo),
    Operation("get", "/version", "getFirecrackerVersion", "The Firecracker API version Ember serves.",
              answer=models.FirecrackerVersion),
    Operation("get", "/machine-config", "getMachineConfiguration", "Gets the machine configuration.",
              answer=cfg.MachineConfig),
    Operation("put", "/machine-config", "putMachineConfiguration", "Sets the machine configuration. Pre-boot only.",
              body=models.MachineConfigPut),
    Operation("patch", "/machine-config", "patchMachineConfiguration",
              "Partially updates the machine configuration. Pre-boot only.", body=models.MachineConfigPatch),
    Operation("get", "/vm/config", "getExportVmConfig", "Gets the full VM configuration.", answer=cfg.VmConfig),
    Operation("put", "/actions", "createSyncAction", "Creates a synchronous action.", body=models.InstanceAction),
    Operation("put", "/boot-source", "putGuestBootSource", "Creates or updates the boot source. Pre-boot only.",
              body=cfg.BootSource),
    Operation("put", "/drives/{drive_id}", "putGuestDriveByID", "Creates or updates a drive. Pre-boot only.",
              body=cfg.Drive),
    Operation("patch", "/drives/{drive_id}", "patchGuestDriveByID", "Updates a drive. Post-boot only.",
              body=models.DrivePatch),
    Operation("put", "/network-interfaces/{iface_id}", "putGuestNetworkInterfaceByID",
              "Creates a network interface. Pre-boot only.", body=cfg.NetworkInterface),
    Operation("patch", "/network-interfaces/{iface_id}", "patchGuestNetworkInterfaceByID",
              "Updates a network interface's rate limiters. Post-boot only.", body=models.NetworkInterfacePatch),
    Operation("put", "/vsock", "putGuestVsock", "Creates or updates the vsock device. Pre-boot only.",
              body=cfg.Vsock),
    Operation("put", "/entropy", "putEntropyDevice", "Creates the entropy device. Pre-boot only.",
              body=cfg.Entropy),
    Operation("put", "/logger", "putLogger", "Configures the logger. Pre-boot only.", body=cfg.Logger),
    Operation("put", "/metrics", "putMetrics", "Configures the metrics target. Pre-boot only.", body=cfg.Metrics),
    Operation("patch", "/vm", "patchVm", "Pauses or resumes the microVM.", body=models.VmStateUpdate),
    Operation("get", "/openapi.json", "getOpenApi", "This description (Ember extension)."),
]


def build_spec() -> dict:
    """The whole OpenAPI document, from OPERATIONS and the models."""
    types = [t for op in OPERATIONS for t in (op.body, op.answer) if t is not None] + [models.Fault]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ember (Firecracker-compatible API)", "version": __version__,
                 "description": "Firecracker's REST API as served by Ember over a Unix socket."},
        "paths": paths,
        "components": {"schemas": components},
    }


def _operation(op: Operation) -> dict:
    fault = {"description": "Bad input or wrong state",
             "content": {"application/json": {"schema": {"$ref": _REF.format(name="Fault")}}}}
    out: dict = {"operationId": op.operation_id, "summary": op.summary,
                 "responses": {"400": fault, "default": {**fault, "description": "Internal error"}}}
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": _REF.format(name=op.body.__name__)}}}}
        out["responses"]["204"] = {"description": "Done"}
    elif op.answer is not None:
        out["responses"]["200"] = {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": _REF.format(name=op.answer.__name__)}}}}
    else:
        out["responses"]["200"] = {"description": "OK", "content": {"application/json": {
            "schema": {"type": "object"}}}}
    if "{" in op.path:
        name = op.path.split("{", 1)[1].rstrip("}")
        out["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]
    return out


def render(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


@lru_cache(maxsize=1)
def load_spec() -> dict:
    """The shipped description (generated at import when it is missing)."""
    try:
        with open(SPEC_FILE, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return build_spec()


def main() -> int:
    """Write the generated description next to this module."""
    with open(SPEC_FILE, "w", encoding="utf-8") as f:
        f.write(render(build_spec()))
    sys.stderr.write(f"wrote {SPEC_FILE}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
