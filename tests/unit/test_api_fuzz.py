"""Fuzz every operation of Ember's OpenAPI description against the live server.

schemathesis generates requests (valid and invalid bodies, odd ids) from
``ember/api/openapi.json``; each goes over the Unix socket to the server with a
fake MicroVM. No answer may be a 5xx, every fault is a ``fault_message``, every
200 body matches its documented schema, and nothing hangs.
"""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="API fuzzing needs schemathesis (test extra)")
jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="comes with schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from ember.api.openapi import load_spec  # noqa: E402
from test_api_support import FakeMachine, serving  # noqa: E402

MAX_EXAMPLES = 50
DEADLINE_MS = 2000
ALLOWED = {200, 204, 400, 413}

SPEC = load_spec()
SCHEMA = schemathesis.openapi.from_dict(SPEC)
OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in SCHEMA.get_all_operations())}


def _strategy(op):
    """Valid requests and schemathesis' deliberately invalid ones."""
    return op.as_strategy(GenerationMode.POSITIVE) | op.as_strategy(GenerationMode.NEGATIVE)


def _send(client, case) -> tuple[int, object]:
    kwargs = case.as_transport_kwargs(base_url="http://localhost")
    path = kwargs["url"].removeprefix("http://localhost") or "/"
    if "json" in kwargs:
        raw = json.dumps(kwargs["json"]).encode()
    else:
        raw = kwargs.get("data")
        raw = raw.encode() if isinstance(raw, str) else raw
    status, payload = client.call(kwargs["method"], path, raw=raw)
    assert status in ALLOWED, (kwargs["method"], path, raw, status, payload)
    if status >= 400:
        assert isinstance(payload["fault_message"], str) and payload["fault_message"]
    return status, payload


def _answer_validator(op) -> jsonschema_rs.Validator | None:
    answer = SPEC["paths"][op.path][op.method]["responses"].get("200")
    if answer is None:
        return None
    root = dict(answer["content"]["application/json"]["schema"], components=SPEC["components"])
    return jsonschema_rs.validator_for(root)


@pytest.fixture
def live(tmp_path, monkeypatch):
    """The server; logger and metrics targets are recorded, not opened (fuzzed paths)."""
    monkeypatch.chdir(tmp_path)
    FakeMachine.instances.clear()
    with serving(tmp_path) as (ctl, client):
        monkeypatch.setattr(ctl.logs, "configure", lambda path, *a: None)
        monkeypatch.setattr(ctl.metrics, "configure", lambda path: None)
        yield ctl, client


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_no_server_errors(live, name):
    ctl, client = live
    op = OPERATIONS[name]
    validator = _answer_validator(op)

    @settings(max_examples=MAX_EXAMPLES, deadline=DEADLINE_MS, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_strategy(op))
    def check(case):
        status, payload = _send(client, case)
        if status == 200 and validator is not None:
            validator.validate(payload)

    check()
    assert client.call("GET", "/")[0] == 200  # still serving


def test_every_route_is_described():
    from ember.api.routes import ROUTES
    described = set()
    for path, methods in SPEC["paths"].items():
        for method in methods:
            key = path.strip("/").split("/{")[0]
            described.add((method.upper(), key))
    assert described == set(ROUTES)


def test_fuzz_after_start(live, tmp_path):
    """The runtime half: a started VM answers fuzzed PATCH /vm and actions sanely."""
    ctl, client = live
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    assert client.call("PUT", "/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
    assert client.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    for name in ("PATCH /vm", "PATCH /drives/{drive_id}", "PATCH /network-interfaces/{iface_id}"):
        op = OPERATIONS[name]

        @settings(max_examples=MAX_EXAMPLES, deadline=DEADLINE_MS, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(_strategy(op))
        def check(case):
            _send(client, case)

        check()
    assert client.call("GET", "/")[1]["state"] in ("Running", "Paused")
