"""Running one command in the rig: QEMU (TCG, emulated AMD-V) booting the L1 kernel.

Builds the qemu-system-x86_64 command line (microvm machine, PVH entry of the
ELF vmlinux, virtio-mmio 9p shares for the host root, control and out dirs,
virtio-serial ports for the command's stdout/stderr; see QEMU's docs/system
i386/microvm.rst and the 9p "local" fsdev), streams output, enforces the limit.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from ember.errors import EmberError
from ember.rig.monitor import cpu_report

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
MACHINE = "microvm,acpi=on"
# EPYC carries SVM and NPT, which TCG emulates (nested paging for the L2
# guests); the features TCG lacks are turned off so QEMU does not warn.
TCG_MISSING = ("rdseed", "sha-ni", "fxsr-opt", "misalignsse", "3dnowprefetch", "osvw", "topoext",
               "perfctr-core", "clzero", "xsaveerptr", "ibpb", "nrip-save", "xsavec", "xsaves")
CPU_MODEL = ",".join(["EPYC", *(f"-{flag}" for flag in TCG_MISSING)])
DEFAULT_TSC_KHZ = 2_000_000
KERNEL_ARGS = ("console=ttyS0", "quiet", "loglevel=4", "panic=-1", "mitigations=off",
               "tsc=reliable", "cryptomgr.notests", "random.trust_cpu=on", "kvm_amd.npt=1")
TIMEOUT_STATUS = 124
READ_CHUNK = 65536
CONSOLE_TAIL_LINES = 20
WATCH_POLL_S = 2.0
BOOT_LIMIT_S = 180.0
"""The rig reaches its command in about 5 s; one that has not after this long stalled while booting
(seen once: the emulated host's kernel livelocked 0.6 s in), before the command could do anything."""
BOOT_ATTEMPTS = 2
STARTED_NAME = "started"  # the rig's init creates it in the control share just before the command


@dataclass
class RigRun:
    """Everything one rig boot needs."""

    vmlinux: Path
    initrd: Path
    run_dir: Path
    out_dir: Path | None = None
    memory_mib: int = 4096
    cpus: int = 2
    extra_kernel_args: list[str] = field(default_factory=list)
    snapshots: list[tuple[Path, Path]] = field(default_factory=list)

    @property
    def ctl_dir(self) -> Path:
        return self.run_dir / "ctl"

    @property
    def monitor_socket(self) -> Path:
        """QEMU's human monitor: where a stalled rig is asked what its CPUs execute."""
        return self.run_dir / "monitor.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"


def qemu_escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


def host_tsc_khz(cpuinfo: str) -> int:
    """TCG's TSC ticks at the host's rate; 'cpu MHz' from /proc/cpuinfo gives it."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1000)
            except ValueError:
                break
    return DEFAULT_TSC_KHZ


def _share(tag: str, path: Path, readonly: bool) -> list[str]:
    opts = f"local,id={tag},path={qemu_escape(str(path))},security_model=none,multidevs=remap"
    if readonly:
        opts += ",readonly=on"
    return ["-fsdev", opts, "-device", f"virtio-9p-device,fsdev={tag},mount_tag={tag}"]


def _port(name: str, fd: int) -> list[str]:
    chardev = name.replace(".", "_")
    return ["-chardev", f"file,id={chardev},path=/dev/fd/{fd}",
            "-device", f"virtserialport,chardev={chardev},name={name}"]


def qemu_argv(run: RigRun, stdout_fd: int, stderr_fd: int, tsc_khz: int) -> list[str]:
    """The full QEMU command line for ``run``."""
    append = " ".join([*KERNEL_ARGS, f"tsc_early_khz={tsc_khz}", *run.extra_kernel_args])
    argv = [
        QEMU, "-M", MACHINE, "-accel", "tcg,thread=multi", "-cpu", CPU_MODEL,
        "-smp", str(run.cpus), "-m", str(run.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none", "-no-reboot",
        "-kernel", str(run.vmlinux), "-initrd", str(run.initrd), "-append", append,
        "-serial", f"file:{run.console_log}",
        "-monitor", f"unix:{qemu_escape(str(run.monitor_socket))},server=on,wait=off",
        *_share("hostroot", Path("/"), readonly=True),
        *_share("ctl", run.ctl_dir, readonly=False),
    ]
    if run.out_dir is not None:
        argv += _share("out", run.out_dir, readonly=False)
    for index, (_tree, image) in enumerate(run.snapshots):
        argv += ["-drive", f"file={qemu_escape(str(image))},if=none,format=raw,readonly=on,id=tree{index}",
                 "-device", f"virtio-blk-device,drive=tree{index},serial=tree{index}"]
    argv += ["-device", "virtio-serial-device", *_port("ember.stdout", stdout_fd), *_port("ember.stderr", stderr_fd)]
    return argv


def _pump(source: int, sink: TextIO) -> None:
    """Copy a pipe to ``sink`` as data arrives."""
    buffer: BinaryIO | None = getattr(sink, "buffer", None)
    with os.fdopen(source, "rb", buffering=0) as pipe:
        while chunk := pipe.read(READ_CHUNK):
            if buffer is not None:
                sink.flush()
                buffer.write(chunk)
                buffer.flush()
            else:
                sink.write(chunk.decode(errors="replace"))
                sink.flush()


def read_status(run: RigRun) -> int | None:
    """The command's exit status as the rig's init wrote it, or None."""
    try:
        text = (run.ctl_dir / "status").read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def console_tail(run: RigRun) -> str:
    try:
        lines = run.console_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no console output)"
    return "\n".join(lines[-CONSOLE_TAIL_LINES:]) or "(no console output)"


@dataclass
class ProgressWatch:
    """Stop the rig when it stops making progress, so a hung rig costs minutes, not the whole limit.

    ``path`` is a file the command rewrites as it goes (a test's start and end);
    ``stall_s`` without a change means the command hung. ``heartbeat``, once it
    exists, is a file the command rewrites every few seconds whatever it is
    doing; ``heartbeat_stall_s`` without a change means the emulated host itself
    stopped (seen: both of its CPUs livelocked in QEMU, nothing printed).
    """

    path: Path
    stall_s: float
    heartbeat: Path | None = None
    heartbeat_stall_s: float = 0.0
    _progress: _Quiet = field(default_factory=lambda: _Quiet())
    _beats: _Quiet = field(default_factory=lambda: _Quiet())
    tripped: bool = False  # it stopped the rig
    heartbeat_silent: bool = False  # ... because the heartbeat stopped, not the progress
    reason: str = ""

    def stalled(self, now: float) -> bool:
        quiet, _ = self._progress.seconds(self.path, now)
        if quiet >= self.stall_s:
            self.tripped, self.reason = True, f"showed no progress in {self.path.name} for {self.stall_s:g} s"
        elif self.heartbeat is not None:
            silent, beating = self._beats.seconds(self.heartbeat, now)
            if beating and silent >= self.heartbeat_stall_s:  # before the first beat, only the progress rule
                self.tripped = self.heartbeat_silent = True
                self.reason = f"stopped writing its heartbeat {self.heartbeat.name} for {self.heartbeat_stall_s:g} s"
        return self.tripped


@dataclass
class _Quiet:
    """How long a file has gone unchanged, from successive looks; the first look starts the clock."""

    stamp: tuple[int, int] | None = None
    since: float | None = None

    def seconds(self, path: Path, now: float) -> tuple[float, bool]:
        """(seconds since the file last changed, whether it exists)."""
        try:
            info = path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self.stamp or self.since is None:
            self.stamp, self.since = stamp, now
        return now - self.since, stamp is not None


def _wait(proc: subprocess.Popen, deadline: float, late: str, watch: ProgressWatch | None,
          started: Path | None = None, boot_by: float = 0.0) -> str | None:
    """Wait for QEMU to exit; why it must be stopped instead, or None once it exited.
    With ``started``, a rig that has not created that file by ``boot_by`` is stopped as stalled."""
    while True:
        now = time.monotonic()
        if now >= deadline:
            return late
        if started is not None and now >= boot_by:
            if not started.exists():
                return f"did not start: the rig's kernel had not reached its init's command after {BOOT_LIMIT_S:g} s"
            started = None
        if watch is not None and watch.stalled(now):
            return watch.reason
        try:
            proc.wait(timeout=min(WATCH_POLL_S, deadline - now))
            return None
        except subprocess.TimeoutExpired:
            continue


def boot(run: RigRun, timeout: float, stdout: TextIO, stderr: TextIO, watch: ProgressWatch | None = None) -> int:
    """Boot the rig, stream the command's output, return its exit status (124 when stopped:
    past ``timeout``, or stalled by ``watch``). A boot that stalls before the command starts
    is stopped and booted again (BOOT_ATTEMPTS in all, within the same ``timeout``)."""
    if shutil.which(QEMU) is None:
        raise EmberError(f"the rig needs {QEMU} (apt-get install qemu-system-x86)")
    deadline = time.monotonic() + timeout
    for attempt in range(1, BOOT_ATTEMPTS):
        status = _boot_once(run, deadline, timeout, stdout, stderr, watch, may_retry=True)
        if status is not None:
            return status
        stderr.write(f"ember rig: booting it again (attempt {attempt + 1} of {BOOT_ATTEMPTS})\n")
        stderr.flush()
    status = _boot_once(run, deadline, timeout, stdout, stderr, watch, may_retry=False)
    assert status is not None
    return status


def _boot_once(run: RigRun, deadline: float, timeout: float, stdout: TextIO, stderr: TextIO,
               watch: ProgressWatch | None, may_retry: bool) -> int | None:
    """One QEMU boot: the command's status, or None when the boot stalled and ``may_retry``."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    tsc = host_tsc_khz(Path("/proc/cpuinfo").read_text())
    argv = qemu_argv(run, out_w, err_w, tsc)
    log.debug("rig: %s", " ".join(argv))
    started_file = run.ctl_dir / STARTED_NAME
    started_file.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, pass_fds=(out_w, err_w))
    os.close(out_w)
    os.close(err_w)
    pumps = [threading.Thread(target=_pump, args=a, daemon=True)
             for a in ((out_r, stdout), (err_r, stderr), (os.dup(proc.stderr.fileno()), stderr))]
    proc.stderr.close()
    for pump in pumps:
        pump.start()
    why = _wait(proc, deadline, f"did not finish within {timeout:g} s", watch,
                started=started_file, boot_by=started + BOOT_LIMIT_S)
    if why is not None:
        cpus = cpu_report(run.monitor_socket, run.ctl_dir / "kallsyms")
        proc.kill()
        proc.wait()
        for pump in pumps:
            pump.join(timeout=5)
        # A command that never started changed nothing: booting again is safe while time is left.
        retry = may_retry and not started_file.exists() and time.monotonic() < deadline
        stderr.write(f"ember rig: the command {why}; the rig was stopped. "
                     f"Its console's last lines:\n{console_tail(run)}\n{cpus}\n")
        stderr.flush()
        return None if retry else TIMEOUT_STATUS
    for pump in pumps:
        pump.join(timeout=5)
    log.info("rig run took %.1f s", time.monotonic() - started)
    status = read_status(run)
    if status is None:
        raise EmberError(f"the rig stopped (qemu exit {proc.returncode}) without the command's exit status; "
                         f"console tail:\n{console_tail(run)}")
    return status


def make_run_dir() -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="ember-rig-"))
    (run_dir / "ctl").mkdir()
    return run_dir
