"""Ember's command line: ``ember run``, ``exec``, ``images``, ``rig``, ``host-check``, ``firecracker``.

Every user error is one line on stderr and a non-zero exit, never a
traceback. ``ember run`` boots the default guest when given no kernel, and
runs inside the rig when the local KVM cannot boot standard kernels.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import shlex
import sys
import time

from ember import stackdump
from ember.errors import EmberError

STARTED_NS = time.monotonic_ns()
EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
SUMMARY_ROWS = 8


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ember", description="A microVM monitor for Linux KVM, in Python.")
    parser.add_argument("--version", action="version", version=f"ember {_version()}")
    sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="boot a microVM (the default guest when no --kernel is given)")
    run.add_argument("--kernel", help="guest kernel: ELF vmlinux or bzImage")
    run.add_argument("--initrd", help="initramfs (cpio, optionally gzip-compressed)")
    run.add_argument("--rootfs", help="root file system image, attached as a virtio block device")
    run.add_argument("--drive", action="append", default=[], metavar="PATH[,ro]",
                     help="extra raw disk image (repeatable)")
    run.add_argument("--net", action="append", default=[], metavar="TAP[,mac=MAC]",
                     help="virtio-net on a TAP device (created if missing; repeatable)")
    run.add_argument("--vsock", metavar="UDS_PATH",
                     help="virtio-vsock, Firecracker style: host connects to UDS_PATH, guest to UDS_PATH_PORT")
    run.add_argument("--vsock-cid", type=int, default=3, metavar="CID", help="guest vsock CID (default 3)")
    run.add_argument("--cmdline", help="kernel command line (replaces the default)")
    run.add_argument("--mem", type=int, default=256, metavar="MiB", help="guest memory (default 256)")
    run.add_argument("--vcpus", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument("--console", default="stdio", metavar="stdio|file:PATH|none", help="guest console")
    run.add_argument("--agent-sock", metavar="PATH", help="Unix socket for `ember exec` (default guest only)")
    run.add_argument("--verbose", "-v", action="store_true",
                     help="print boot time, VM exits by reason and each virtio device's counters")
    run.add_argument("--no-rig", action="store_true", help="never fall back to the rig")
    run.add_argument("--register-exits", action="store_true",
                     help="serve the guest's virtio register loads through VM exits instead of the "
                          "read-only register page: slower, but every access shows in the exit table")
    run.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="command for the default guest's init to run (then it powers off)")

    ex = sub.add_parser("exec", help="run a command in a running guest through its agent")
    target = ex.add_mutually_exclusive_group(required=True)
    target.add_argument("--agent-sock", metavar="PATH", help="the agent's serial-port socket (ember run --agent-sock)")
    target.add_argument("--vsock", metavar="UDS_PATH", help="the VM's vsock Unix socket (ember run --vsock)")
    ex.add_argument("--timeout", type=float, default=60.0)
    ex.add_argument("guest_command", nargs=argparse.REMAINDER, metavar="-- COMMAND")

    images = sub.add_parser("images", help="build or locate the default guest images")
    isub = images.add_subparsers(dest="images_command", required=True, parser_class=_Parser)
    isub.add_parser("build", help="build the kernel, initramfs and ext4 root file system")
    path = isub.add_parser("path", help="print a cached artifact's path, building it if missing")
    path.add_argument("artifact", choices=["kernel", "vmlinux", "initrd", "rootfs"])

    rig = sub.add_parser("rig", help="run a command inside the rig (emulated host with AMD-V)")
    from ember.rig.cli import add_rig_arguments

    add_rig_arguments(rig)

    sub.add_parser("host-check", help="report what the local KVM offers")
    sub.add_parser("firecracker", help="Firecracker-compatible VMM process (see --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks beside QEMU; writes docs/benchmarks.md", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    stackdump.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from benchmarks import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["firecracker"]:
        from ember.api.firecracker_cli import main as firecracker_main
        return firecracker_main(argv[1:], prog="ember firecracker")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ember: %(message)s")
    try:
        return _dispatch(args, argv)
    except EmberError as err:
        print(f"ember: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.subcommand == "run":
        return cmd_run(args, argv)
    if args.subcommand == "exec":
        from ember.agent import run_command, run_command_vsock
        command = _strip_dashes(args.guest_command)
        if args.vsock:
            return run_command_vsock(args.vsock, command, timeout=args.timeout)
        return run_command(args.agent_sock, command, timeout=args.timeout)
    if args.subcommand == "images":
        return cmd_images(args)
    if args.subcommand == "rig":
        from ember.rig.cli import rig_command
        return rig_command(args)
    if args.subcommand == "host-check":
        from ember.rig.cli import host_check_command
        return host_check_command(args)
    raise EmberError(f"unknown command {args.subcommand}")


def cmd_images(args: argparse.Namespace) -> int:
    from ember import images

    if args.images_command == "build":
        for name, path in images.build_all(progress=sys.stderr.isatty()).items():
            print(f"{name}: {path}")
        return 0
    print(images.artifact_path(args.artifact, build=True, progress=sys.stderr.isatty()))
    return 0


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    command = _strip_dashes(args.guest_command)
    config = run_config(args, command)
    if not args.no_rig and not os.environ.get("EMBER_IN_RIG"):
        from ember.rig.hostcheck import host_kvm

        host = host_kvm()
        if not host.can_boot_linux:
            from ember.machine import preflight

            preflight(config)
            return _run_in_rig(host.detail, config, args, command)
    return boot(config, args)


def run_config(args: argparse.Namespace, command: list[str]):
    """Turn `ember run` options into a validated VmConfig (default images when no kernel)."""
    from ember import config as cfg

    if args.vcpus < 1 or args.vcpus > cfg.MAX_VCPUS:
        raise EmberError(f"--vcpus must be between 1 and {cfg.MAX_VCPUS}")
    if args.mem < cfg.MIN_MEM_MIB:
        raise EmberError(f"--mem must be at least {cfg.MIN_MEM_MIB} MiB")
    check_console_spec(args.console)
    kernel, initrd = args.kernel, args.initrd
    if kernel is None:
        from ember import images

        kernel = str(images.artifact_path("kernel", build=True, progress=sys.stderr.isatty()))
        if initrd is None and args.rootfs is None:
            initrd = str(images.artifact_path("initrd", build=True, progress=sys.stderr.isatty()))
    drives = []
    if args.rootfs:
        drives.append(cfg.Drive(drive_id="rootfs", path_on_host=args.rootfs, is_root_device=True))
    for index, spec in enumerate(args.drive):
        path, _, flags = spec.partition(",")
        if flags not in ("", "ro"):
            raise EmberError(f"invalid --drive {spec!r}: the only flag is ',ro'")
        drives.append(cfg.Drive(drive_id=f"drive{index}", path_on_host=path,
                                is_root_device=False, is_read_only=flags == "ro"))
    interfaces = [_net_interface(index, spec) for index, spec in enumerate(args.net)]
    vsock = cfg.Vsock(guest_cid=args.vsock_cid, uds_path=args.vsock) if args.vsock else None
    boot_args = args.cmdline if args.cmdline is not None else cfg.DEFAULT_BOOT_ARGS
    if args.rootfs and args.cmdline is None:
        boot_args += " root=/dev/vda rw"
    if command:
        encoded = base64.b64encode(guest_shell_command(command).encode()).decode()
        boot_args += f" ember.cmd={encoded}"
    if args.agent_sock:
        boot_args += " ember.agent=1"
    config = cfg.VmConfig(
        boot_source=cfg.BootSource(kernel_image_path=kernel, initrd_path=initrd, boot_args=boot_args),
        machine_config=cfg.MachineConfig(vcpu_count=args.vcpus, mem_size_mib=args.mem),
        drives=drives,
        network_interfaces=interfaces,
        vsock=vsock,
        entropy=cfg.Entropy(),
    )
    cfg.validate(config)
    return config


def _net_interface(index: int, spec: str):
    from ember import config as cfg

    name, _, option = spec.partition(",")
    mac = None
    if option:
        key, _, mac = option.partition("=")
        if key != "mac" or not mac:
            raise EmberError(f"invalid --net {spec!r}: expected TAP[,mac=MAC]")
    if not name or len(name) > 15:
        raise EmberError(f"invalid --net {spec!r}: a TAP name has 1 to 15 characters")
    return cfg.NetworkInterface(iface_id=f"eth{index}", host_dev_name=name, guest_mac=mac)


def check_console_spec(spec: str) -> None:
    if spec not in ("stdio", "none") and not (spec.startswith("file:") and len(spec) > 5):
        raise EmberError(f"invalid console {spec!r}: expected stdio, none or file:PATH")


def boot(config, args: argparse.Namespace) -> int:
    from ember.machine import MicroVM

    stdin = sys.stdin.fileno() if args.console == "stdio" and _has_stdin() else None
    vm = MicroVM(config, console=args.console, console_input=stdin,
                 agent_socket=args.agent_sock, started_ns=STARTED_NS,
                 mirror_registers=not args.register_exits)
    try:
        vm.start()
        info = vm.wait()
    except KeyboardInterrupt:
        vm.stop()
        info = vm.wait(timeout=10)
    finally:
        vm._teardown()
    if args.verbose:
        _print_summary(vm, info)
    if info.reason.value in ("error", "panic", "triple-fault"):
        print(f"ember: {info.describe()}", file=sys.stderr)
    return info.exit_code


def _run_in_rig(why: str, config, args: argparse.Namespace, command: list[str]) -> int:
    from ember import rig

    print(f"ember: {why}; booting inside the rig (an emulated host with AMD-V)", file=sys.stderr)
    inner = [sys.executable, "-m", "ember", "run", "--no-rig",
             "--kernel", config.boot_source.kernel_image_path,
             "--mem", str(args.mem), "--vcpus", str(args.vcpus), "--console", args.console]
    if config.boot_source.initrd_path:
        inner += ["--initrd", config.boot_source.initrd_path]
    if args.cmdline is not None:
        inner += ["--cmdline", args.cmdline]
    if args.rootfs:
        inner += ["--rootfs", os.path.abspath(args.rootfs)]
    for spec in args.drive:
        inner += ["--drive", os.path.abspath(spec)]
    for spec in args.net:
        inner += ["--net", spec]
    if args.vsock:
        inner += ["--vsock", os.path.abspath(args.vsock), "--vsock-cid", str(args.vsock_cid)]
    if args.agent_sock:
        inner += ["--agent-sock", os.path.abspath(args.agent_sock)]
    if args.verbose:
        inner.append("--verbose")
    if args.register_exits:
        inner.append("--register-exits")
    if command:
        inner += ["--", *command]
    return rig.run(inner, cwd=os.getcwd())


def _print_summary(vm, info) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = vm.metrics()
    console = Console(stderr=True)
    boot_us = metrics["boot_time_us"]
    guest_us = metrics["guest_boot_time_us"]
    boot_text = "not reported" if boot_us is None else f"{boot_us / 1000:.1f} ms from process start"
    console.print(f"[bold]{info.describe() if info else 'running'}[/]")
    console.print(f"boot time to init: {boot_text}", soft_wrap=True)
    if guest_us is not None:
        console.print(f"guest boot time: {guest_us / 1000:.1f} ms from the first KVM_RUN to init", soft_wrap=True)
    table = Table(title="VM exits by reason")
    for col in ("reason", "count", "mean µs in Ember"):
        table.add_column(col, justify="right" if col != "reason" else "left")
    for reason, stat in metrics["exits"]["by_reason"].items():
        mean = stat["total_ns"] / stat["count"] / 1000 if stat["count"] else 0
        table.add_row(reason, str(stat["count"]), f"{mean:.1f}")
    console.print(table)
    by_device = sorted(metrics["exits"]["by_device"].items(), key=lambda kv: -kv[1]["total_ns"])
    table = Table(title="PIO/MMIO exits by address (most time first)")
    for col in ("address", "count", "total ms in Ember"):
        table.add_column(col, justify="right" if col != "address" else "left")
    for target, stat in by_device[:SUMMARY_ROWS]:
        table.add_row(target, str(stat["count"]), f"{stat['total_ns'] / 1e6:.1f}")
    console.print(table)
    rows = device_rows(metrics)
    if rows:
        table = Table(title="virtio devices")
        table.add_column("device")
        table.add_column("counters (non-zero)")
        for row in rows:
            table.add_row(*row)
        console.print(table)


_DEVICE_GROUPS = ("block_", "net_", "vsock", "entropy")  # per device; "block" and "net" are their sums


def device_rows(metrics: dict) -> list[tuple[str, str]]:
    """(device, its non-zero counters) for each virtio device in a machine's metrics."""
    rows = []
    for group, counters in metrics.items():
        if isinstance(counters, dict) and group.startswith(_DEVICE_GROUPS):
            shown = ", ".join(f"{key} {_amount(key, value)}" for key, value in counters.items() if value)
            rows.append((group, shown or "idle"))
    return rows


def _amount(key: str, value: int) -> str:
    """A counter for people: byte counts in KiB, MiB or GiB."""
    if "bytes" not in key or value < 1024:
        return str(value)
    size, unit = value / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _has_stdin() -> bool:
    try:
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False


def _strip_dashes(command: list[str]) -> list[str]:
    return command[1:] if command[:1] == ["--"] else command


def guest_shell_command(command: list[str]) -> str:
    """One argument is a shell command line (like ssh); several are quoted words."""
    return command[0] if len(command) == 1 else shlex.join(command)


def _version() -> str:
    from ember import __version__

    return __version__
