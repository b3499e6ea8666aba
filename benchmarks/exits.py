"""The VM-exit round trip: a micro-guest doing N port writes, each one exit to user space.

Three loops over the same real-mode guest (out dx, al; dec ecx; jnz; hlt):
Ember's raw ember.kvm loop, Ember's real path (VcpuLoop decoding the exit
and dispatching it on the PIO bus), and a C KVM_RUN loop, the native floor.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ember.devices.bus import Bus
from ember.exitstats import ExitStats
from ember.kvm import Kvm
from ember.kvm import structs as k
from ember.memory import GuestMemory
from ember.vcpu_loop import VcpuLoop

from benchmarks.console import BenchError
from benchmarks.progress import Steps
from benchmarks.results import Measure, Results

PORT = 0xF0
MEM_SIZE = 0x10000
LOAD_ADDR = 0x1000
STACK_TOP = 0x8000
RFLAGS_RESERVED = 0x2
C_SOURCE = Path(__file__).with_name("kvm_exit_floor.c")
C_OUTPUT_RE = re.compile(r"exits=(\d+) ns=(\d+)")
NS_PER_US = 1000
FLOOR_TIMEOUT_S = 120
LOOP_TIMEOUT_S = 120  # a run takes seconds; past this, KVM_RUN is stuck (seen once in the rig)
KICK_SIGNAL = signal.SIGUSR1


def guest_code(exits: int) -> bytes:
    """mov ecx, N; mov dx, 0xF0; top: out dx, al; dec ecx; jnz top; hlt (Intel SDM vol. 2)."""
    return (b"\x66\xb9" + struct.pack("<I", exits) + b"\xba" + struct.pack("<H", PORT)
            + b"\xee\x66\x49\x75\xfb\xf4")


class _Sink:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


class MicroVm:
    """One vCPU in real mode at LOAD_ADDR over MEM_SIZE bytes of RAM."""

    def __init__(self, code: bytes, kvm_path: str = "/dev/kvm") -> None:
        self.kvm = Kvm(kvm_path)
        self.vm = self.kvm.create_vm()
        self.memory = GuestMemory([(0, MEM_SIZE)])
        self.memory.register(self.vm)
        self.memory.write(LOAD_ADDR, code)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        for name in ("cs", "ds", "ss"):
            getattr(sregs, name).base = 0
            getattr(sregs, name).selector = 0
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(k.kvm_regs(rip=LOAD_ADDR, rsp=STACK_TOP, rflags=RFLAGS_RESERVED))

    def close(self) -> None:
        for obj in (self.vcpu, self.memory, self.vm, self.kvm):
            obj.close()


@contextlib.contextmanager
def watchdog(vcpu, what: str):
    """Kick ``vcpu`` out of KVM_RUN (immediate_exit and a signal) if the run outlives
    LOOP_TIMEOUT_S, then fail the measure instead of hanging the suite."""
    fired = threading.Event()
    target = threading.get_ident()

    def kick() -> None:
        fired.set()
        vcpu.immediate_exit = True
        signal.pthread_kill(target, KICK_SIGNAL)

    previous = signal.signal(KICK_SIGNAL, lambda *_: None)
    timer = threading.Timer(LOOP_TIMEOUT_S, kick)
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
        signal.signal(KICK_SIGNAL, previous)
    if fired.is_set():
        raise BenchError(f"{what}: KVM_RUN did not finish within {LOOP_TIMEOUT_S} s; the vCPU was kicked out")


def raw_loop_ns(exits: int) -> float:
    """Nanoseconds per exit of a bare Python KVM_RUN loop over ember.kvm."""
    guest = MicroVm(guest_code(exits))
    try:
        vcpu, seen = guest.vcpu, 0
        with watchdog(vcpu, "raw loop"):
            start = time.perf_counter_ns()
            while (reason := vcpu.run()) == k.KVM_EXIT_IO:
                seen += 1
            elapsed = time.perf_counter_ns() - start
    finally:
        guest.close()
    if reason != k.KVM_EXIT_HLT or seen != exits:
        raise BenchError(f"raw loop: {seen} exits then reason {reason}, expected {exits} then HLT")
    return elapsed / exits


def vcpu_loop_ns(exits: int) -> float:
    """Nanoseconds per exit through Ember's VcpuLoop and PIO bus (the path a real guest takes)."""
    guest = MicroVm(guest_code(exits))
    pio = Bus("pio")
    pio.register(PORT, 1, _Sink(), name="sink")
    stats = ExitStats()
    try:
        with watchdog(guest.vcpu, "VcpuLoop") as fired:
            start = time.perf_counter_ns()
            VcpuLoop(guest.vcpu, pio, Bus("mmio"), stats).run(fired.is_set)
            elapsed = time.perf_counter_ns() - start
    finally:
        guest.close()
    seen = stats.by_reason["io"].count
    if seen != exits:
        raise BenchError(f"VcpuLoop: {seen} port exits, expected {exits}")
    return elapsed / exits


def build_floor(directory: Path) -> Path:
    """Compile the C floor with gcc -O2."""
    if shutil.which("gcc") is None:
        raise BenchError("gcc is needed for the C KVM_RUN floor (apt-get install build-essential)")
    binary = directory / "kvm_exit_floor"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(C_SOURCE)], check=True, capture_output=True)
    return binary


def floor_ns(binary: Path, exits: int) -> float:
    try:
        done = subprocess.run([str(binary), str(exits)], capture_output=True, text=True, timeout=FLOOR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"C floor: {exits} exits took over {FLOOR_TIMEOUT_S} s") from None
    found = C_OUTPUT_RE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise BenchError(f"C floor failed: {done.stderr.strip() or done.stdout.strip()}")
    return int(found.group(2)) / int(found.group(1))


def measure_exits(results: Results, exits: int, runs: int, where: str, suffix: str, steps: Steps) -> None:
    """Per-exit µs for Ember (raw loop and VcpuLoop path) against the C floor, alternated."""
    note = f"{exits} port writes per run, each a KVM_EXIT_IO to user space"
    raw = results.add(Measure(f"exit_raw{suffix}", "VM exit round trip, bare ember.kvm loop", "µs", "lower",
                              where, reference_name="C KVM_RUN loop", note=note))
    real = results.add(Measure(f"exit_loop{suffix}", "VM exit round trip, Ember's VcpuLoop + PIO bus", "µs",
                               "lower", where, reference_name="C KVM_RUN loop", note=note))
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        binary = build_floor(Path(tmp))
        for index in range(runs):
            floor = floor_ns(binary, exits) / NS_PER_US
            raw.ember.append(raw_loop_ns(exits) / NS_PER_US)
            real.ember.append(vcpu_loop_ns(exits) / NS_PER_US)
            raw.reference.append(floor)
            real.reference.append(floor)
            steps.step(f"exits ({where}) run {index + 1}: C {floor:.1f} µs, raw {raw.ember[-1]:.1f} µs, "
                       f"VcpuLoop {real.ember[-1]:.1f} µs")
