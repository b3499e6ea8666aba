"""``python -m benchmarks``: run the suite, inside the rig when the host cannot boot Linux guests.

The host side builds the guest images, starts one rig boot running
``python -m benchmarks --inner --out DIR`` (results come back as JSON in DIR),
measures what needs no real guest on the host, then writes the report.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
from pathlib import Path

from benchmarks import chart, report, results as store, settings as conf, sysinfo
from benchmarks.console import BenchError
from benchmarks.progress import Steps
from benchmarks.results import Results
from benchmarks.vmm import Guest
from ember.errors import EmberError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "build" / "benchmarks"
DEFAULT_DOCS = REPO / "docs"
RIG_TIMEOUT_S = 1800.0
RIG_MEMORY_MIB = 4096
EXIT_OK, EXIT_FAILED = 0, 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="Ember beside QEMU: one suite, one report")
    p.add_argument("--runs", type=int, help="runs per figure (default 5; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="few runs and small sizes, for trying it")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the raw results JSON goes")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="where benchmarks.md and .png go")
    p.add_argument("--no-rig", action="store_true", help="run guests on the local KVM, never the rig")
    p.add_argument("--render", action="store_true", help="only re-render the report from --out's results")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernel", help=argparse.SUPPRESS)
    p.add_argument("--initrd", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="benchmarks: %(message)s")
    try:
        s = conf.choose(args.quick, args.runs)
        if args.inner:
            return inner(args, s)
        if args.render:
            return write_docs(store.load(args.out), args.docs)
        return host(args, s, argv)
    except (BenchError, EmberError, ValueError, OSError) as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        return EXIT_FAILED


def guest_images(s: conf.Settings) -> tuple[Guest, str]:
    """The guest both VMMs boot and its description: the PVH-capable vmlinux, else the bzImage."""
    from ember import images

    progress = sys.stderr.isatty()
    vmlinux = images.artifact_path("vmlinux", build=True, progress=progress)
    initrd = images.artifact_path("initrd", build=True, progress=progress)
    config = vmlinux.with_name("config")
    pvh = config.exists() and "CONFIG_PVH=y" in config.read_text()
    kernel = vmlinux if pvh else images.artifact_path("kernel", build=True, progress=progress)
    how = "ELF vmlinux (PVH entry for QEMU)" if pvh else "bzImage (the kernel lacks CONFIG_PVH)"
    guest = Guest(str(kernel), str(initrd), s.mem_mib, s.vcpus)
    described = f"{Path(kernel).name}, {how}; initramfs {Path(initrd).name}; {s.mem_mib} MiB, {s.vcpus} vCPU"
    return guest, described


def vm_where() -> str:
    return "rig (nested KVM)" if os.environ.get("EMBER_IN_RIG") else "host KVM"


def inner(args: argparse.Namespace, s: conf.Settings) -> int:
    """The guest measures, where guests boot (the rig, or a host with hardware KVM)."""
    from benchmarks import exits, profile, vmbench

    if not args.kernel or not args.initrd:
        raise BenchError("--inner needs --kernel and --initrd")
    guest = Guest(args.kernel, args.initrd, s.mem_mib, s.vcpus)
    where = vm_where()
    results = Results(meta={**sysinfo.machine("rig_" if os.environ.get("EMBER_IN_RIG") else "host_")})
    steps = Steps(vmbench.vm_steps(s) + s.runs + 1, f"guests ({where})")
    boot, block, net = vmbench.vm_measures(guest, s, where, steps)
    try:
        for label, measure, measure_args in (boot, block, ("VM exits", exits.measure_exits,
                                                             (s.exits, s.runs, where, "_vm", steps))):
            vmbench.guarded(results, steps, label, measure, *measure_args)
            store.save(results, args.out)  # what is done survives a later hang or the rig's timeout
        try:
            results.profile = profile.profile_block(guest, s, where)
        except (BenchError, EmberError) as err:
            steps.note(f"the profiled Ember run failed, going on: {err}")
        steps.step("profile of one Ember block run")
        store.save(results, args.out)
        vmbench.guarded(results, steps, *net[:2], *net[2])  # TCP last: it needs the newest device
    finally:
        steps.close()
        store.save(results, args.out)
    return EXIT_OK


def run_guests(args: argparse.Namespace, s: conf.Settings, guest: Guest) -> Results:
    """Run the inner suite here or in the rig; return its results."""
    from ember.rig.hostcheck import host_kvm

    out = args.out.resolve() / "guests"
    inner_argv = ["--inner", "--out", str(out), "--kernel", guest.kernel, "--initrd", guest.initrd,
                  "--runs", str(s.runs), *(["--quick"] if args.quick else [])]
    if args.no_rig or host_kvm().can_boot_linux:
        inner(build_parser().parse_args(inner_argv), s)
        return store.load(out)
    from ember import rig

    status = rig.run([sys.executable, "-m", "benchmarks", *inner_argv], cwd=REPO, out_dir=out,
                     timeout=RIG_TIMEOUT_S, memory_mib=RIG_MEMORY_MIB)
    if status != 0:
        if not (out / store.RESULTS_NAME).exists():
            raise BenchError(f"the suite inside the rig failed (exit {status})")
        log.warning("the suite inside the rig ended with exit %d; reporting what it finished", status)
    return store.load(out)


def host(args: argparse.Namespace, s: conf.Settings, argv: list[str]) -> int:
    """The whole suite from the host's side."""
    from benchmarks import exits, startup
    from benchmarks.vmbench import guarded
    from ember.rig.hostcheck import host_kvm

    guest, described = guest_images(s)
    kvm = host_kvm()
    results = Results(meta={
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        **sysinfo.machine("host_"), "host_kvm": kvm.detail, "host_load": sysinfo.load_average(),
        **sysinfo.versions(),
        "guest": described, "guest_kernel": sysinfo.guest_kernel_version(guest.kernel),
        "settings": " ".join(f"{k}={v}" for k, v in s.as_dict().items()),
    })
    results.merge(run_guests(args, s, guest))
    steps = Steps(s.runs + s.startup_runs, "host measures")
    try:
        if kvm.kind != "none" and not _same_machine(results):
            guarded(results, steps, "VM exits", exits.measure_exits, s.exits, s.runs, f"host ({kvm.kind})",
                    "_host", steps)
        guarded(results, steps, "start-up", startup.measure_startup, s.startup_runs, "host", steps)
    finally:
        steps.close()
    store.save(results, args.out)
    return write_docs(results, args.docs)


def _same_machine(results: Results) -> bool:
    """True when the guest measures already ran on this host (exits measured there)."""
    return any(m.where == "host KVM" for m in results.measures)


def write_docs(results: Results, docs: Path) -> int:
    docs.mkdir(parents=True, exist_ok=True)
    chart.draw(results, docs / "benchmarks.png")
    (docs / "benchmarks.md").write_text(report.render(results, report.observations(results)))
    print(f"wrote {docs / 'benchmarks.md'} and {docs / 'benchmarks.png'}", file=sys.stderr)
    return EXIT_OK
