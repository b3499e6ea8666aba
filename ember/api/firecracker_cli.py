"""``ember firecracker`` / ``ember-firecracker``: Firecracker's command line, served by Ember.

Accepts Firecracker's flags (``firecracker --help``: --api-sock, --config-file,
--no-api, --id, --log-path, --level, --metrics-path, --boot-timer, ...) and
its exit statuses (0 on a clean guest shutdown, 152 bad configuration, 153 bad
arguments), so scripts and SDKs that launch Firecracker can launch Ember.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
from typing import Any, Sequence

from ember import __version__
from ember import config as cfg
from ember import stackdump
from ember.api.controller import FIRECRACKER_API_VERSION, MachineFactory, VmmController, default_machine_factory
from ember.api.logs import DEFAULT_INSTANCE_ID, LogSetup
from ember.api.server import DEFAULT_MAX_PAYLOAD, ApiServer
from ember.errors import ConfigError, EmberError

log = logging.getLogger("ember.api.firecracker_cli")  # not __main__ under -m

DEFAULT_API_SOCK = "/run/firecracker.socket"
EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_BAD_CONFIGURATION = 152
EXIT_ARG_PARSING = 153
_CLEAN_REASONS = {"poweroff", "reboot", "stopped"}
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_POLL_S = 0.5
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _ArgError(Exception):
    """A bad command line, reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2
        raise _ArgError(message)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Run a microVM with Firecracker's API and flags (Ember).")
    p.add_argument("--api-sock", default=DEFAULT_API_SOCK, help="Unix socket of the API")
    p.add_argument("--id", default=DEFAULT_INSTANCE_ID, help="microVM identifier")
    p.add_argument("--config-file", help="boot from this JSON configuration without API calls")
    p.add_argument("--no-api", action="store_true", help="serve no API (needs --config-file)")
    p.add_argument("--log-path", help="file or named pipe for the logs")
    p.add_argument("--level", default="Warning", help="Error, Warning, Info, Debug, Trace or Off")
    p.add_argument("--show-level", action="store_true", help="print the level in log lines")
    p.add_argument("--show-log-origin", action="store_true", help="print file:line in log lines")
    p.add_argument("--metrics-path", help="file or named pipe for the metrics")
    p.add_argument("--boot-timer", action="store_true", help="log the guest boot time (always on in Ember)")
    p.add_argument("--seccomp-filter", help="accepted; seccomp arrives with the jailer")
    p.add_argument("--no-seccomp", action="store_true", help="accepted; seccomp arrives with the jailer")
    p.add_argument("--start-time-us", type=int, help="process start time (jailer)")
    p.add_argument("--start-time-cpu-us", type=int, help="process start CPU time (jailer)")
    p.add_argument("--parent-cpu-time-us", type=int, help="parent CPU time (jailer)")
    p.add_argument("--http-api-max-payload-size", type=int, default=DEFAULT_MAX_PAYLOAD,
                   help="largest API request body in bytes")
    p.add_argument("--metadata", help="MMDS contents (not supported by Ember yet)")
    p.add_argument("--mmds-size-limit", type=int, help="MMDS size limit (accepted)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def version_line() -> str:
    return f"Ember v{__version__} (Firecracker API v{FIRECRACKER_API_VERSION} compatible)"


def _reason(info: Any) -> Any:
    """How the guest ended, as the outcome's string value ("poweroff", "triple-fault", ...)."""
    reason = getattr(info, "reason", None)
    return getattr(reason, "value", reason)


def exit_status(info: Any) -> int:
    """Firecracker's status for how the guest ended: 0 when it shut down cleanly."""
    reason = _reason(info)
    status = getattr(info, "status", None)
    if reason == "poweroff" and status:
        return status & 0xFF
    return EXIT_OK if reason in _CLEAN_REASONS else EXIT_GENERIC


def _check_args(args: argparse.Namespace) -> None:
    if args.no_api and not args.config_file:
        raise _ArgError("--no-api requires --config-file (there would be no way to configure the microVM)")
    if not _INSTANCE_ID.match(args.id):
        raise _ArgError(f"invalid --id {args.id!r}: use 1-64 letters, digits and '-'")
    if args.metadata:
        raise _ArgError("--metadata: MMDS is not supported by Ember yet")
    if args.http_api_max_payload_size <= 0:
        raise _ArgError("--http-api-max-payload-size must be positive")


def _startup_metrics(args: argparse.Namespace) -> dict[str, int]:
    """Firecracker's api_server startup times, when the jailer passed its clocks."""
    out: dict[str, int] = {}
    if args.start_time_us is not None:
        out["process_startup_time_us"] = time.time_ns() // 1000 - args.start_time_us
    if args.start_time_cpu_us is not None:
        cpu_us = time.process_time_ns() // 1000
        out["process_startup_time_cpu_us"] = cpu_us - args.start_time_cpu_us + (args.parent_cpu_time_us or 0)
    return out


class _Stopper:
    """Turns SIGTERM/SIGINT/SIGHUP into an event the main loop watches."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.event.set()


def _wait_for_vm(ctl: VmmController, stopper: _Stopper) -> int:
    """Block until the guest ends (its exit status) or a signal (128 + signal)."""
    while not ctl.started.wait(_POLL_S):
        if stopper.event.is_set():
            return 128 + (stopper.signum or 0)
    vm = ctl.vm
    while True:
        info = vm.wait(timeout=_POLL_S)
        if info is not None:
            log.log(logging.INFO if _reason(info) in _CLEAN_REASONS else logging.WARNING, "microVM exited: %s",
                    info.describe() if hasattr(info, "describe") else info)
            return exit_status(info)
        if stopper.event.is_set():
            log.warning("stopping the microVM on signal %s", stopper.signum)
            return 128 + (stopper.signum or 0)


def _boot_from_file(ctl: VmmController, path: str) -> int | None:
    """Configure and start from ``--config-file``; an exit status on failure."""
    try:
        config = cfg.load_file(path)
        ctl.configure(config)
    except EmberError as err:
        log.error("Configuration for VMM from one single json failed: %s", err)
        _say(f"bad configuration in {path}: {err}")
        return EXIT_BAD_CONFIGURATION
    try:
        ctl.start()
    except EmberError as err:
        log.error("Failed to start the microVM: %s", err)
        _say(str(err))
        return EXIT_GENERIC
    return None


def _say(message: str) -> None:
    sys.stderr.write(f"ember-firecracker: error: {message}\n")


def _run(args: argparse.Namespace, factory: MachineFactory | None) -> int:
    logs = LogSetup(args.id)
    try:
        logs.configure(args.log_path, args.level, args.show_level, args.show_log_origin)
    except ConfigError as err:
        _say(str(err))
        return EXIT_ARG_PARSING if "log level" in str(err) else EXIT_GENERIC
    log.info("Running %s", version_line())
    if not args.no_seccomp:
        log.warning("seccomp filters are not applied yet (they arrive with the jailer)%s",
                    f"; ignoring {args.seccomp_filter}" if args.seccomp_filter else "")
    ctl = VmmController(instance_id=args.id, machine_factory=factory or default_machine_factory(), logs=logs)
    ctl.api_server_metrics.update(_startup_metrics(args))
    server: ApiServer | None = None
    stopper = _Stopper()
    stopper.install()
    try:
        if args.metrics_path:
            ctl.metrics.configure(args.metrics_path)
        if not args.no_api:
            server = ApiServer(args.api_sock, ctl, args.http_api_max_payload_size)
            server.start()
        if args.config_file:
            failed = _boot_from_file(ctl, args.config_file)
            if failed is not None:
                return failed
        return _wait_for_vm(ctl, stopper)
    except EmberError as err:
        _say(str(err))
        return EXIT_GENERIC
    finally:
        if server is not None:
            server.close()
        ctl.shutdown()
        logs.close()


def main(argv: Sequence[str] | None = None, *, prog: str = "ember-firecracker",
         machine_factory: MachineFactory | None = None) -> int:
    """Entry point; returns the process exit status."""
    stackdump.install()
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        if args.version:
            print(version_line())
            return EXIT_OK
        _check_args(args)
    except _ArgError as err:
        sys.stderr.write(f"{prog}: error: {err} (see --help)\n")
        return EXIT_ARG_PARSING
    return _run(args, machine_factory)


if __name__ == "__main__":
    sys.exit(main())
