"""Guest-level measures, Ember and QEMU alternated run by run on the same guest.

Boot time to init (console marker, plus Ember's own boot timer), VMM memory
overhead (smaps while the guest sleeps), virtio-blk sequential throughput
(busybox dd with O_DIRECT on /dev/vda) and, when Ember has --net, TCP to host.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import netbench, smaps
from benchmarks.console import BenchError, ConsoleProcess
from benchmarks.progress import Steps
from benchmarks.results import Measure, Results
from benchmarks.settings import Settings
from benchmarks.vmm import (EMBER, QEMU_NAME, Disk, Guest, Launch, argv_for, ember_boot_ms, ember_guest_boot_ms,
                            run_order)

log = logging.getLogger(__name__)

BOOT_MARK = "EMBER-BOOT-MARK"
DONE_MARK = "EMBER-BENCH-DONE"
WRITE_START, WRITE_END, READ_END = "BLK-W0", "BLK-W1", "BLK-R1"
GUEST_STAMP = "ember-bench-stamp"
"""Written to /dev/kmsg around each dd: the kernel log's timestamps time the transfer on the guest's clock."""
_STAMP_LINE = re.compile(r"\[\s*(\d+\.\d+)\] " + GUEST_STAMP + r" (\w+)\s*$")
MIB = 1 << 20
# After its last marker Ember powers off by itself (and prints its summary); QEMU's microvm has no
# reset path for `reboot -f` and would spin, so it is stopped at once.
EXIT_GRACE_S = {EMBER: 20.0, QEMU_NAME: 0.2}
KIB_PER_MIB = 1024


def _series(results: Results, key: str, title: str, unit: str, better: str, where: str,
            target: float | None = None, note: str = "") -> Measure:
    return results.add(Measure(key, title, unit, better, where, target=target, note=note))


def _append(measure: Measure, vmm: str, value: float) -> None:
    (measure.ember if vmm == EMBER else measure.reference).append(value)


def boot_once(vmm: str, guest: Guest, s: Settings) -> tuple[float, str, smaps.MemorySplit]:
    """(seconds to the boot marker, the VMM's stderr, memory split while alive)."""
    command = f"echo {BOOT_MARK}; sleep {s.alive_s:g}; echo {DONE_MARK}"
    with ConsoleProcess(argv_for(vmm, Launch(guest, command)), name=vmm) as proc:
        booted = proc.wait_for(BOOT_MARK, s.vm_timeout_s)
        time.sleep(s.sample_after_s)
        memory = smaps.sample(proc.pid, guest.mem_mib * MIB)
        proc.wait_for(DONE_MARK, s.vm_timeout_s)
        proc.finish(EXIT_GRACE_S[vmm])
    return booted, proc.stderr_text(), memory


def measure_boot(results: Results, guest: Guest, s: Settings, where: str, steps: Steps) -> None:
    console = _series(results, "boot_console", "Boot to init (console marker, from spawn)", "ms", "lower",
                      where, target=1.0, note="`echo` by the guest's init, timestamped on the console pipe")
    timer = _series(results, "boot_timer", "Boot to init (Ember's boot-timer device)", "ms", "lower", where,
                    note="Ember only: from the clock `ember run` reads as its CLI module loads (after the "
                    "interpreter's own start-up) to the guest's write of 123 at 0xd0000000")
    timer.reference_name = "—"
    guest_only = _series(results, "boot_guest", "Guest boot, first KVM_RUN to init (Ember's boot timer)", "ms",
                         "lower", where, note="Ember only: the guest's own boot, Ember's start-up left out")
    guest_only.reference_name = "—"
    rss = _series(results, "rss_total", "VMM process RSS (total)", "MiB", "lower", where,
                  note=f"sampled {s.sample_after_s:g} s after the boot marker while the guest sleeps")
    overhead = _series(results, "rss_overhead", "VMM memory overhead (RSS minus guest RAM)", "MiB", "lower",
                       where, target=1.0)
    for index in range(s.runs):
        for vmm in run_order(index):
            booted, stderr, memory = boot_once(vmm, guest, s)
            _append(console, vmm, booted * 1000)
            _append(rss, vmm, memory.total_kib / KIB_PER_MIB)
            _append(overhead, vmm, memory.overhead_kib / KIB_PER_MIB)
            if vmm == EMBER:
                _record_ember_timers(stderr, timer, guest_only)
            steps.step(f"boot {vmm} run {index + 1}: {booted * 1000:.0f} ms, "
                       f"overhead {memory.overhead_kib / KIB_PER_MIB:.1f} MiB")


def _record_ember_timers(stderr: str, timer: Measure, guest_only: Measure) -> None:
    for measure, value in ((timer, ember_boot_ms(stderr)), (guest_only, ember_guest_boot_ms(stderr))):
        if value is not None:
            measure.ember.append(value)


def block_command(mib: int) -> str:
    """dd straight to the disk (O_DIRECT), then back, each between two kernel-log stamps; dd's own
    output kept off the console until the end, then the stamps (dmesg) for the host to read."""
    def stamp(tag: str) -> str:
        return f"echo {GUEST_STAMP} {tag} >/dev/kmsg"
    return (f"echo {WRITE_START}; {stamp('w0')}; dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/tmp/w; "
            f"{stamp('w1')}; echo {WRITE_END}; "
            f"{stamp('r0')}; dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/tmp/r; "
            f"{stamp('r1')}; echo {READ_END}; cat /tmp/w /tmp/r; dmesg | grep {GUEST_STAMP}; echo {DONE_MARK}")


def guest_stamps(lines: list[str]) -> dict[str, float]:
    """The guest's kernel-log stamps (seconds since its boot) by tag, from the console's lines."""
    return {m[2]: float(m[1]) for line in lines if (m := _STAMP_LINE.search(line))}


def guest_rates(vmm: str, lines: list[str], mib: int) -> tuple[float, float]:
    """(write, read) MiB/s on the guest's clock: from the stamp before each dd to the one after.

    The console markers the host sees would add the serial port's latency, which is not the disk's
    (in the rig it put 10 to 30 ms on each 0.5 s transfer, most under Ember, whose 8250 is Python)."""
    stamps = guest_stamps(lines)
    if not {"w0", "w1", "r0", "r1"} <= stamps.keys():
        raise BenchError(f"{vmm}: the guest's dd stamps are missing (got {sorted(stamps)}); console tail:\n"
                         + "\n".join(lines[-15:]))
    write_s, read_s = stamps["w1"] - stamps["w0"], stamps["r1"] - stamps["r0"]
    if write_s <= 0 or read_s <= 0:
        raise BenchError(f"{vmm}: the guest's dd stamps do not advance: {stamps}")
    return mib / write_s, mib / read_s


def block_once(vmm: str, guest: Guest, s: Settings, image: Path) -> tuple[float, float]:
    """(write MiB/s, read MiB/s) of one boot."""
    with open(image, "wb") as f:
        # Every block allocated before the boot: the writes then time the VMM's data path,
        # not tmpfs allocating pages (which stalls single requests for tens of ms in the rig).
        os.posix_fallocate(f.fileno(), 0, s.disk_mib * MIB)
    command = block_command(s.disk_mib)
    with ConsoleProcess(argv_for(vmm, Launch(guest, command, disks=[Disk(str(image))])), name=vmm) as proc:
        for marker in (WRITE_START, WRITE_END, READ_END, DONE_MARK):  # each phase gets the whole timeout
            proc.wait_for(marker, s.vm_timeout_s)
        proc.finish(EXIT_GRACE_S[vmm])
        check_dd(vmm, proc, s.disk_mib)
        return guest_rates(vmm, proc.console_lines(), s.disk_mib)


def check_dd(vmm: str, proc: ConsoleProcess, mib: int) -> None:
    """Both dd runs must have copied every MiB (else the 'throughput' timed a failure)."""
    done = f"{mib}+0 records out"
    if sum(line.strip() == done for line in proc.console_lines()) != 2:
        raise BenchError(f"{vmm}: dd on /dev/vda did not copy {mib} MiB both ways; console tail:\n"
                         f"{proc.console_tail()}")


def measure_block(results: Results, guest: Guest, s: Settings, where: str, steps: Steps) -> None:
    note = (f"{s.disk_mib} MiB, bs=1M, O_DIRECT in the guest, timed on the guest's clock (kernel-log stamps "
            "around each dd); raw image on tmpfs, allocated in full before "
            "each boot; each VMM's default queue (Ember 512 entries, so a 1 MiB I/O is one request; "
            "QEMU 256, seg_max 254, so it is two)")
    write = _series(results, "blk_write", "virtio-blk sequential write", "MiB/s", "higher", where, 1.0, note)
    read = _series(results, "blk_read", "virtio-blk sequential read", "MiB/s", "higher", where, 1.0, note)
    with tempfile.TemporaryDirectory(prefix="ember-bench-", dir=_scratch_dir()) as tmp:
        image = Path(tmp) / "disk.img"
        for index in range(s.runs):
            for vmm in run_order(index):
                try:
                    w, r = block_once(vmm, guest, s, image)
                except BenchError as err:  # one stuck run (seen in the rig) costs that run, not the series
                    _run_failed((write, read), steps, f"block {vmm} run {index + 1}", err)
                    continue
                _append(write, vmm, w)
                _append(read, vmm, r)
                steps.step(f"block {vmm} run {index + 1}: write {w:.1f} MiB/s, read {r:.1f} MiB/s")


def _run_failed(measures: tuple[Measure, ...], steps: Steps, label: str, err: BenchError) -> None:
    """One run of a series failed: the series goes on, and its row in the report says so."""
    first_line = str(err).splitlines()[0]
    for measure in measures:
        measure.missing = f"failed ({label}: {first_line})"
    steps.step(f"{label} failed, going on: {first_line}")


def _scratch_dir() -> str | None:
    """/dev/shm when present (tmpfs: the disk measures the VMM, not the host's disk)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def measure_net(results: Results, guest: Guest, s: Settings, where: str, steps: Steps) -> None:
    net = _series(results, "tcp_tx", "TCP guest → host over TAP", "MiB/s", "higher", where, 1.0,
                  f"{s.net_mib} MiB from busybox nc to a host socket on the TAP's address; both "
                  "VMMs serve virtio-net in user space (QEMU's default, vhost off)")
    why = netbench.unavailable()
    if why is not None:
        net.missing = why
        steps.step(f"TCP: {why}")
        for _ in range(2 * s.runs - 1):
            steps.step("TCP: skipped")
        return
    with netbench.TapNetwork() as tap:
        for index in range(s.runs):
            for vmm in run_order(index):
                try:
                    rate = netbench.tcp_once(vmm, guest, s, tap)
                except BenchError as err:  # one stuck or faulted run costs that run, not the series
                    _run_failed((net,), steps, f"TCP {vmm} run {index + 1}", err)
                    continue
                _append(net, vmm, rate)
                steps.step(f"TCP {vmm} run {index + 1}: {rate:.1f} MiB/s")


def vm_steps(s: Settings) -> int:
    return 3 * 2 * s.runs


def guarded(results: Results, steps: Steps, label: str, measure, *args) -> None:
    """Run one measure; if it fails, its figures say so in the report and the suite goes on."""
    first = len(results.measures)
    try:
        measure(results, *args)
    except BenchError as err:
        summary = str(err).splitlines()[0]
        for m in results.measures[first:]:
            m.missing = f"failed: {summary}"
        steps.note(f"{label} failed, going on: {err}")


def vm_measures(guest: Guest, s: Settings, where: str, steps: Steps) -> list[tuple[str, Callable, tuple]]:
    """(label, function, arguments after ``results``) of each guest measure, in the order they run."""
    return [("boot", measure_boot, (guest, s, where, steps)), ("block", measure_block, (guest, s, where, steps)),
            ("TCP", measure_net, (guest, s, where, steps))]
