"""Host side of the `ember exec` guest-agent line protocol (pure encode/decode).

The agent (ember/images/agent.sh, started by init when the kernel command line
has ``ember.agent=1``) talks over a dedicated 8250 UART, /dev/ttyS1 in the guest
(COM2: port 0x2f8, IRQ 3), set to raw mode. Every message is one ASCII line
ending in "\\n" of the form ``KIND SP ID SP PAYLOAD`` (a trailing "\\r" is ignored):

    guest -> host  READY 0 <version>        the agent is listening (version 1)
    host -> guest  EXEC <id> <base64 cmd>    run ``sh <file holding cmd>``,
                                             stdin /dev/null
    guest -> host  OUT <id> <base64 stdout>  (payload empty when no output)
    guest -> host  ERR <id> <base64 stderr>
    guest -> host  RC <id> <status>          decimal exit status; last reply

ids are decimal integers chosen by the host; requests are served one at a
time, in order. Base64 is the standard alphabet without line breaks (the agent
also accepts URL-safe). A request whose payload is not base64 gets empty OUT,
an explanation in ERR and RC 127. Lines with an unknown verb or a non-numeric
id are ignored by the agent.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import NamedTuple

KIND_READY = "READY"
KIND_OUT = "OUT"
KIND_ERR = "ERR"
KIND_RC = "RC"
REPLY_KINDS = (KIND_READY, KIND_OUT, KIND_ERR, KIND_RC)
REQUEST_EXEC = b"EXEC"
PROTOCOL_VERSION = 1
MAX_ID = 2**31 - 1
MAX_STATUS = 255
BAD_REQUEST_STATUS = 127


class AgentProtocolError(ValueError):
    """A line from the guest that does not follow the protocol."""


class Reply(NamedTuple):
    """One parsed line: payload is bytes (OUT/ERR), int (RC) or version int (READY)."""

    kind: str
    id: int
    payload: bytes | int


@dataclass
class ExecResult:
    """What one EXEC request produced."""

    stdout: bytes
    stderr: bytes
    status: int


def encode_request(request_id: int, cmd: str | bytes) -> bytes:
    """The EXEC line asking the agent to run shell command ``cmd``."""
    if not 0 <= request_id <= MAX_ID:
        raise ValueError(f"request id {request_id} out of range")
    body = cmd.encode() if isinstance(cmd, str) else bytes(cmd)
    return b"%s %d %s\n" % (REQUEST_EXEC, request_id, base64.b64encode(body))


def _parse_int(text: str, limit: int, what: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > limit:
        raise AgentProtocolError(f"bad {what} {text[:32]!r}")
    return int(text)


def _decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise AgentProtocolError(f"payload is not base64: {exc}") from None


def parse_reply(line: bytes | str) -> Reply:
    """Parse one line from the agent; raises AgentProtocolError if malformed."""
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            raise AgentProtocolError("reply is not ASCII") from None
    parts = line.rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or parts[0] not in REPLY_KINDS:
        raise AgentProtocolError(f"unknown reply {line[:40]!r}")
    kind, rid = parts[0], _parse_int(parts[1], MAX_ID, "id")
    payload = parts[2] if len(parts) == 3 else ""
    if kind in (KIND_OUT, KIND_ERR):
        return Reply(kind, rid, _decode_b64(payload))
    if kind == KIND_RC:
        return Reply(kind, rid, _parse_int(payload, MAX_STATUS, "status"))
    return Reply(kind, rid, _parse_int(payload, MAX_ID, "version"))


class ExecCollector:
    """Gathers the OUT/ERR/RC replies of one request into an ExecResult."""

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self._stdout = b""
        self._stderr = b""

    def feed(self, reply: Reply) -> ExecResult | None:
        """Take one reply; returns the result once RC arrives, else None."""
        if reply.id != self.request_id or reply.kind == KIND_READY:
            return None
        if reply.kind == KIND_OUT:
            self._stdout += reply.payload  # type: ignore[operator]
        elif reply.kind == KIND_ERR:
            self._stderr += reply.payload  # type: ignore[operator]
        else:
            return ExecResult(self._stdout, self._stderr, int(reply.payload))
        return None
