"""Request routing: (method, path, body) to a controller call and an HTTP answer.

Mirrors Firecracker's ``parsed_request.rs``: the first path segment selects
the resource, empty PUT/PATCH bodies and GET bodies are refused first, and an
unknown pair answers 400 "Invalid request method and/or path". Counts each
request under Firecracker's metric names (``put_api_requests.drive_count``...).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable

from ember.api import openapi
from ember.api.controller import VmmController
from ember.api.faults import EMPTY_PATCH, EMPTY_PUT, GET_WITH_BODY, ApiError, invalid_path, not_supported

log = logging.getLogger(__name__)

# Firecracker features Ember does not serve yet, by first path segment.
UNSUPPORTED = {
    "balloon": "the balloon device",
    "mmds": "MMDS",
    "snapshot": "snapshots",
    "cpu-config": "custom CPU templates",
    "hotplug": "hotplug",
    "serial": "serial console configuration",
    "pmem": "pmem devices",
}
_METRIC_GROUPS = {"GET": "get_api_requests", "PUT": "put_api_requests", "PATCH": "patch_api_requests"}


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status and an optional JSON-able body."""

    status: int
    body: Any = None

    def encoded(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


Handler = Callable[[VmmController, list[str], bytes], Any]


def _no_id(func: Callable[[VmmController, bytes], Any]) -> Handler:
    def handler(ctl: VmmController, rest: list[str], body: bytes) -> Any:
        return func(ctl, body)
    return handler


def _with_id(func: Callable[[VmmController, str | None, bytes], Any]) -> Handler:
    def handler(ctl: VmmController, rest: list[str], body: bytes) -> Any:
        return func(ctl, rest[0] if rest else None, body)
    return handler


def _get(func: Callable[[VmmController], Any]) -> Handler:
    def handler(ctl: VmmController, rest: list[str], body: bytes) -> Any:
        return func(ctl)
    return handler


# (method, path without its id) -> (handler, metric key)
ROUTES: dict[tuple[str, str], tuple[Handler, str]] = {
    ("GET", ""): (_get(VmmController.describe_instance), "instance_info"),
    ("GET", "version"): (_get(VmmController.version), "vmm_version"),
    ("GET", "machine-config"): (_get(VmmController.get_machine_config), "machine_cfg"),
    ("GET", "vm/config"): (_get(VmmController.get_vm_config), "vm_config"),
    ("GET", "openapi.json"): (_get(lambda ctl: openapi.load_spec()), "openapi"),
    ("PUT", "actions"): (_no_id(VmmController.action), "actions"),
    ("PUT", "boot-source"): (_no_id(VmmController.put_boot_source), "boot_source"),
    ("PUT", "drives"): (_with_id(VmmController.put_drive), "drive"),
    ("PUT", "network-interfaces"): (_with_id(VmmController.put_network_interface), "network"),
    ("PUT", "machine-config"): (_no_id(VmmController.put_machine_config), "machine_cfg"),
    ("PUT", "vsock"): (_no_id(VmmController.put_vsock), "vsock"),
    ("PUT", "entropy"): (_no_id(VmmController.put_entropy), "entropy"),
    ("PUT", "logger"): (_no_id(VmmController.put_logger), "logger"),
    ("PUT", "metrics"): (_no_id(VmmController.put_metrics), "metrics"),
    ("PATCH", "drives"): (_with_id(VmmController.patch_drive), "drive"),
    ("PATCH", "network-interfaces"): (_with_id(VmmController.patch_network_interface), "network"),
    ("PATCH", "machine-config"): (_no_id(VmmController.patch_machine_config), "machine_cfg"),
    ("PATCH", "vm"): (_no_id(VmmController.patch_vm), "vmm"),
}
_ID_RESOURCES = {"drives", "network-interfaces"}


def split_path(raw_path: str) -> list[str]:
    """Firecracker's tokenizing: drop the query, leading slashes and one trailing slash."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
    tokens = path.split("/")
    if len(tokens) > 1 and tokens[-1] == "":
        tokens.pop()
    return tokens


def _resolve(method: str, tokens: list[str]) -> tuple[tuple[Handler, str], list[str]]:
    """The route for a path and the path segments left for it (the id)."""
    resource = tokens[0]
    if resource in _ID_RESOURCES and len(tokens) <= 2:
        route = ROUTES.get((method, resource))
        if route:
            return route, tokens[1:]
    if resource not in _ID_RESOURCES:
        route = ROUTES.get((method, "/".join(tokens)))
        if route:
            return route, []
    if resource in UNSUPPORTED:
        raise not_supported(UNSUPPORTED[resource])
    raise invalid_path(method, "/".join(tokens))


def _check_body(method: str, body: bytes) -> None:
    if method == "GET" and body:
        raise ApiError(GET_WITH_BODY)
    if method == "PUT" and not body:
        raise ApiError(EMPTY_PUT)
    if method == "PATCH" and not body:
        raise ApiError(EMPTY_PATCH)


def dispatch(ctl: VmmController, method: str, raw_path: str, body: bytes) -> Reply:
    """Serve one request; never raises for a client's mistake."""
    tokens = split_path(raw_path)
    group = _METRIC_GROUPS.get(method)
    key = None
    try:
        _check_body(method, body)
        (handler, key), rest = _resolve(method, tokens)
        if group:
            ctl.counters.inc(group, f"{key}_count")
        result = handler(ctl, rest, body)
    except ApiError as err:
        if group and key:
            ctl.counters.inc(group, f"{key}_fails")
        log.info("%s %s refused: %s", method, raw_path, err)
        return Reply(err.status, {"fault_message": str(err)})
    if result is None:
        return Reply(HTTPStatus.NO_CONTENT)
    return Reply(HTTPStatus.OK, result)
