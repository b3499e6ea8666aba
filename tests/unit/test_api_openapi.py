"""The shipped OpenAPI description is the one the models generate today."""

from __future__ import annotations

import json

from ember.api import openapi


def test_shipped_openapi_is_current():
    with open(openapi.SPEC_FILE, encoding="utf-8") as f:
        shipped = f.read()
    assert shipped == openapi.render(openapi.build_spec()), \
        "ember/api/openapi.json is stale: run `python -m ember.api.openapi`"


def test_openapi_uses_firecracker_operation_ids_and_fields():
    spec = json.loads(openapi.render(openapi.build_spec()))
    ids = {op["operationId"] for methods in spec["paths"].values() for op in methods.values()}
    assert {"describeInstance", "putGuestBootSource", "putGuestDriveByID", "patchGuestDriveByID",
            "createSyncAction", "patchVm", "getExportVmConfig", "putMachineConfiguration"} <= ids
    drive = spec["components"]["schemas"]["Drive"]
    assert {"drive_id", "path_on_host", "is_root_device", "is_read_only"} <= set(drive["properties"])
    assert drive["additionalProperties"] is False
    put_mc = spec["components"]["schemas"]["MachineConfigPut"]
    assert set(put_mc["required"]) == {"vcpu_count", "mem_size_mib"}
    vm_config = spec["components"]["schemas"]["VmConfig"]
    assert {"boot-source", "machine-config", "network-interfaces"} <= set(vm_config["properties"])
