"""Ember's benchmark suite: Ember beside QEMU on the same guest, one command, one report.

``python -m benchmarks`` measures boot time, VMM memory overhead, virtio-blk
and TCP throughput, the VM-exit round trip and start-up to the API socket,
each over several alternated runs, then writes docs/benchmarks.md and .png.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the suite (see benchmarks.cli); returns the exit status."""
    from benchmarks.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
