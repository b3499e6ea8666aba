"""HTTP/1.1 over a Unix socket: the transport of Firecracker's API.

Like Firecracker's ``micro_http`` server: persistent connections,
Content-Length bodies up to ``--http-api-max-payload-size`` (51200 bytes by
default), JSON answers, and ``{"fault_message": ...}`` for every error,
including malformed HTTP. One thread per connection; the controller's lock
serializes the calls.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import stat
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from ember.api.controller import VmmController
from ember.api.faults import ApiError
from ember.api.routes import Reply, dispatch
from ember.errors import EmberError

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 51200
SERVER_NAME = "Ember API"
_CONNECTION_TIMEOUT_S = 300
_POLL_INTERVAL_S = 0.05
_DISCARD_LIMIT = 16 << 20
_DISCARD_CHUNK = 64 << 10
_API_THREAD = "fc_api"


class _Handler(BaseHTTPRequestHandler):
    """One connection; ``server.controller`` does the work."""

    protocol_version = "HTTP/1.1"
    server: "ApiServer"
    timeout = _CONNECTION_TIMEOUT_S

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # every method, known or not, goes to the router
            return self._serve
        raise AttributeError(name)

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ApiError as err:
            self.close_connection = True
            self._reply(Reply(err.status, {"fault_message": str(err)}))
            return
        try:
            reply = dispatch(self.server.controller, self.command, self.path, body)
        except Exception:  # a bug, not the client's fault: answer 500 and keep serving
            log.exception("internal error serving %s %s", self.command, self.path)
            reply = Reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"fault_message": "Internal server error."})
        if self.command == "HEAD":
            self.close_connection = True
        self._reply(reply)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise ApiError("Transfer-Encoding is not supported; send a Content-Length body.")
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw.isdigit():
            raise ApiError(f"Invalid Content-Length: {raw!r}")
        length = int(raw)
        limit = self.server.max_payload
        if length > limit:
            self._discard(length)
            raise ApiError(f"Request payload with size {length} is larger than the limit of {limit} "
                           "allowed by server.", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length) if length else b""

    def _discard(self, length: int) -> None:
        """Read and drop a refused body, so that the client, still sending it, reads our
        answer instead of a reset connection (bodies past _DISCARD_LIMIT just get the reset)."""
        left = length if length <= _DISCARD_LIMIT else 0
        while left > 0 and (chunk := self.rfile.read(min(left, _DISCARD_CHUNK))):
            left -= len(chunk)

    def _reply(self, reply: Reply) -> None:
        payload = reply.encoded()
        self.send_response(reply.status)
        if reply.status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if reply.status != HTTPStatus.NO_CONTENT and self.command != "HEAD":
            self.wfile.write(payload)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed HTTP (bad request line, headers): a JSON fault, then close."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        if not hasattr(self, "command") or self.command is None:
            self.command = "GET"
        status = HTTPStatus.BAD_REQUEST if code >= 500 else code
        self.request_version = self.protocol_version  # answer with a status line even to HTTP/0.9
        self._reply(Reply(status, {"fault_message": text}))

    def version_string(self) -> str:
        return SERVER_NAME

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        log.debug("api: " + format, *args)

    def log_request(self, code="-", size="-") -> None:
        log.debug("api: %s %s -> %s", self.command, getattr(self, "path", "?"), code)


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves the API on a Unix socket path until ``close()``."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, controller: VmmController, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        _refuse_existing(path)
        self.path = path
        self.controller = controller
        self.max_payload = max_payload
        self._thread: threading.Thread | None = None
        try:
            super().__init__(path, _Handler)
        except OSError as err:
            raise EmberError(f"Failed to open the API socket at: {path}: {err.strerror}") from None

    def process_request_thread(self, request, client_address) -> None:
        threading.current_thread().name = _API_THREAD  # log lines name it like Firecracker
        super().process_request_thread(request, client_address)

    def start(self) -> None:
        """Serve in a background thread (named like Firecracker's ``fc_api``)."""
        self._thread = threading.Thread(target=self.serve_forever, args=(_POLL_INTERVAL_S,),
                                        name=_API_THREAD, daemon=True)
        self._thread.start()
        log.info("API server listening on %s", self.path)

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _refuse_existing(path: str) -> None:
    """Like Firecracker, never replace an existing path (another VMM may own it)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise EmberError(f"Failed to open the API socket at: {path}: {err.strerror}") from None
    kind = "socket" if stat.S_ISSOCK(mode) else "file"
    raise EmberError(f"Failed to open the API socket at: {path}: a {kind} already exists there. "
                     "Check that it is not already used.")


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    """A client connection to an API socket (tests and tools)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock
