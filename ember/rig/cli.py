"""Command-line surfaces of the rig: ``ember rig`` and ``ember host-check``.

The lead's ember/cli.py wires these in: ``add_rig_arguments(parser)`` then
``rig_command(args)``, and ``host_check_command(args)``; each returns the exit
status. ``rig_main``/``host_check_main`` take a plain argv for direct use.
"""

from __future__ import annotations

import argparse
import sys

from ember.rig import DEFAULT_TIMEOUT, run
from ember.rig.hostcheck import host_kvm


def add_rig_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ember rig [--timeout S] [--out DIR] [--memory MIB] [--cpus N] -- COMMAND...``."""
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds before the rig is stopped (exit 124)")
    parser.add_argument("--out", metavar="DIR", help="host directory whose writes inside the rig come back")
    parser.add_argument("--memory", type=int, default=4096, metavar="MIB", help="rig memory in MiB")
    parser.add_argument("--cpus", type=int, default=2, help="rig vCPUs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")


def rig_command(args: argparse.Namespace) -> int:
    """Run args.command in the rig; its exit status is ours."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("ember rig: give a command to run after --", file=sys.stderr)
        return 2
    return run(command, timeout=args.timeout, out_dir=args.out, memory_mib=args.memory, cpus=args.cpus)


def host_check_command(args: argparse.Namespace | None = None) -> int:
    """Print what the local KVM offers (always exit 0: it is a report)."""
    verdict = host_kvm()
    print(f"kvm: {verdict.kind}")
    print(f"detail: {verdict.detail}")
    print(f"boots standard Linux guests: {'yes' if verdict.can_boot_linux else 'no (system tests use the rig)'}")
    return 0


def rig_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember rig", description="run a command inside the emulated-SVM rig")
    add_rig_arguments(parser)
    return rig_command(parser.parse_args(argv))


def host_check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember host-check", description="report what the local KVM offers")
    return host_check_command(parser.parse_args(argv))
