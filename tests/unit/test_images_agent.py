"""The `ember exec` agent protocol: host encoder/decoder and a round trip through agent.sh."""

from __future__ import annotations

import base64
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.images.agent_protocol import (
    AgentProtocolError, ExecCollector, ExecResult, Reply, encode_request, parse_reply,
)

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
AGENT = Path(str(resources.files("ember.images").joinpath("agent.sh")))
needs_busybox = pytest.mark.skipif(not Path(BUSYBOX).exists(),
                                   reason="busybox is not installed (apt-get install busybox-static)")


def test_encode_request():
    assert encode_request(7, "echo hi") == b"EXEC 7 " + base64.b64encode(b"echo hi") + b"\n"
    with pytest.raises(ValueError):
        encode_request(-1, "x")


def test_parse_replies():
    assert parse_reply(b"READY 0 1\n") == Reply("READY", 0, 1)
    assert parse_reply(b"OUT 3 aGk=\r\n") == Reply("OUT", 3, b"hi")
    assert parse_reply("ERR 3 \n") == Reply("ERR", 3, b"")
    assert parse_reply("ERR 3") == Reply("ERR", 3, b"")
    assert parse_reply(b"RC 3 255\n") == Reply("RC", 3, 255)


@pytest.mark.parametrize("line", [b"", b"HELLO 1 x", b"OUT x aGk=", b"OUT 1 a", b"RC 1 256",
                                  b"RC 1 -1", b"OUT 1 \xff", b"RC 1 \xd9\xa3", b"RC 99999999999 0",
                                  b"OUT 1 aGk=\n extra"])
def test_parse_rejects_malformed(line):
    with pytest.raises(AgentProtocolError):
        parse_reply(line)


@given(st.binary(max_size=200))
def test_parse_never_raises_anything_else(line):
    try:
        parse_reply(line)
    except AgentProtocolError:
        pass


@given(rid=st.integers(0, 2**31 - 1), out=st.binary(max_size=100), err=st.binary(max_size=100),
       rc=st.integers(0, 255))
def test_collector_round_trip(rid, out, err, rc):
    lines = [f"OUT {rid} {base64.b64encode(out).decode()}\n", f"ERR {rid} {base64.b64encode(err).decode()}\n",
             f"RC {rid} {rc}\n"]
    collector = ExecCollector(rid)
    results = [collector.feed(parse_reply(line.encode())) for line in lines]
    assert results == [None, None, ExecResult(out, err, rc)]


def serve(requests: bytes, tmp_path: Path) -> list[Reply]:
    script = f'EMBER_AGENT_LIB=1 . "{AGENT}"; agent_serve "{tmp_path}"'
    proc = subprocess.run([BUSYBOX, "sh", "-c", script], input=requests, capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return [parse_reply(line) for line in proc.stdout.splitlines()]


@needs_busybox
def test_agent_round_trip(tmp_path):
    cmds = {1: "echo out; echo err >&2; exit 5", 2: "printf '\\000\\377 binary'", 3: "cat; true"}
    requests = b"".join(encode_request(i, c) for i, c in cmds.items())
    replies = serve(b"garbage line\nEXEC x aGk=\n" + requests, tmp_path)
    assert replies[0] == Reply("READY", 0, 1)
    results = {}
    for rid in cmds:
        collector = ExecCollector(rid)
        for reply in replies[1:]:
            results[rid] = collector.feed(reply) or results.get(rid)
    assert results[1] == ExecResult(b"out\n", b"err\n", 5)
    assert results[2] == ExecResult(b"\0\xff binary", b"", 0)
    assert results[3] == ExecResult(b"", b"", 0)  # stdin is /dev/null
    assert len(replies) == 1 + 3 * len(cmds)


@needs_busybox
def test_agent_bad_base64_gets_127(tmp_path):
    replies = serve(b"EXEC 9 a\r\n", tmp_path)
    assert replies[-1] == Reply("RC", 9, 127)
    assert b"not valid base64" in replies[-2].payload
