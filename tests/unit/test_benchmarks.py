"""The benchmark suite's pure parts: statistics, smaps parsing, argv building and the report."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import report, settings, smaps, stats, vmm
from benchmarks.exits import guest_code
from benchmarks.results import Measure, Results, from_json, to_json

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


def test_summary_of_odd_and_even_series():
    s = stats.summarize([5.0, 1.0, 3.0])
    assert (s.n, s.median, s.low, s.high) == (3, 3.0, 1.0, 5.0)
    assert stats.summarize([1.0, 2.0, 3.0, 10.0]).median == 2.5
    one = stats.summarize([7.0])
    assert (one.q1, one.median, one.q3) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        stats.summarize([])


@given(st.lists(finite, min_size=1, max_size=40))
def test_summary_is_ordered(values):
    s = stats.summarize(values)
    assert s.low <= s.median <= s.high
    assert s.low == min(values) and s.high == max(values)


def test_ratio_and_targets():
    assert stats.ratio([2.0, 4.0, 3.0], [1.0, 1.5, 2.0]) == pytest.approx(2.0)
    assert stats.ratio([], [1.0]) is None
    assert stats.ratio([1.0], [0.0]) is None
    assert stats.meets(0.9, 1.0, "lower") is True
    assert stats.meets(1.1, 1.0, "lower") is False
    assert stats.meets(1.1, 1.0, "higher") is True
    assert stats.meets(None, 1.0, "higher") is None
    assert stats.meets(2.0, None, "lower") is None


SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123   /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0010200000 rw-p 00000000 00:00 0
Size:             264192 kB
Rss:               20000 kB
7f0020000000-7f0020021000 rw-p 00000000 00:00 0    [heap]
Size:                132 kB
Rss:                 100 kB
7f0030000000-7f0040000000 rw-s 00000000 00:01 77   /dev/shm/other
Size:             262144 kB
Rss:                5000 kB
"""


def test_smaps_split_finds_the_guest_ram_mapping():
    mappings = smaps.parse_smaps(SMAPS)
    assert [m.rss_kib for m in mappings] == [800, 20000, 100, 5000]
    assert mappings[2].path == "[heap]"
    split = smaps.split(mappings, 256 << 20)
    assert split.total_kib == 25900
    assert split.guest_kib == 20000  # the anonymous 258 MiB block; the file-backed one is not guest RAM
    assert split.overhead_kib == 5900


def test_smaps_split_without_guest_ram():
    split = smaps.split(smaps.parse_smaps(SMAPS), 1 << 30)
    assert split.guest_kib == 0 and split.overhead_kib == split.total_kib


@given(st.text(max_size=500))
def test_smaps_parser_survives_any_text(text):
    for mapping in smaps.parse_smaps(text):
        assert mapping.rss_kib >= 0


def test_both_vmms_get_the_same_guest():
    guest = vmm.Guest("/k/vmlinux", "/k/initrd.cpio.gz", 256, 1)
    launch = vmm.Launch(guest, "echo hi", disks=[vmm.Disk("/dev/shm/d.img")])
    ember, qemu = vmm.ember_argv(launch), vmm.qemu_argv(launch)
    assert ember[-2:] == ["--", "echo hi"]
    for flag, value in (("--kernel", "/k/vmlinux"), ("--initrd", "/k/initrd.cpio.gz"), ("--mem", "256"),
                        ("--vcpus", "1"), ("--drive", "/dev/shm/d.img")):
        assert ember[ember.index(flag) + 1] == value
    for flag, value in (("-kernel", "/k/vmlinux"), ("-initrd", "/k/initrd.cpio.gz"), ("-m", "256"),
                        ("-smp", "1")):
        assert qemu[qemu.index(flag) + 1] == value
    append = qemu[qemu.index("-append") + 1]
    encoded = append.split("ember.cmd=")[1]
    assert base64.b64decode(encoded).decode() == "echo hi"
    assert "cache=writeback,aio=threads" in qemu[qemu.index("-drive") + 1]
    assert "--net" not in ember and "-netdev" not in qemu


def test_both_vmms_get_the_same_nic():
    launch = vmm.Launch(vmm.Guest("/k", "/i"), "true", tap=vmm.Tap("tap9"))
    ember, qemu = vmm.ember_argv(launch), vmm.qemu_argv(launch)
    assert ember[ember.index("--net") + 1] == "tap9,mac=02:00:0a:c8:00:02"
    assert qemu[qemu.index("-netdev") + 1].startswith("tap,id=n0,ifname=tap9,script=no")
    assert "mac=02:00:0a:c8:00:02" in qemu[qemu.index("-netdev") + 3]


def test_run_order_alternates():
    assert vmm.run_order(0) == ("Ember", "QEMU")
    assert vmm.run_order(1) == ("QEMU", "Ember")


def test_ember_boot_figure_is_read_from_verbose_output():
    assert vmm.ember_boot_ms("guest poweroff (status 0); boot time to init: 9766.9 ms\n") == 9766.9
    assert vmm.ember_boot_ms("no figure") is None
    text = "boot time to init: 900.5 ms\nguest boot time: 612.0 ms from the first KVM_RUN to init\n"
    assert (vmm.ember_boot_ms(text), vmm.ember_guest_boot_ms(text)) == (900.5, 612.0)
    assert vmm.ember_guest_boot_ms("boot time to init: 900.5 ms") is None


def test_exit_guest_encodes_the_count():
    code = guest_code(0x01020304)
    assert code[:2] == b"\x66\xb9" and code[2:6] == bytes([4, 3, 2, 1])
    assert code.endswith(b"\xee\x66\x49\x75\xfb\xf4")  # out; dec ecx; jnz -5 (back to out); hlt


def test_settings_quick_and_runs():
    assert settings.choose(True, None).runs == 2
    assert settings.choose(False, 7).runs == 7
    assert settings.choose(False, 7).disk_mib == settings.DEFAULT.disk_mib
    with pytest.raises(ValueError):
        settings.choose(False, 0)


def sample_results() -> Results:
    r = Results(meta={"date": "2025-01-01 00:00 UTC", "command": "python -m benchmarks",
                      "host_cpu": "Test CPU"})
    r.add(Measure("boot_console", "Boot to init", "ms", "lower", "rig", [120.0, 100.0, 140.0],
                  [90.0, 100.0, 95.0], target=1.0, note="console marker"))
    r.add(Measure("blk_read", "virtio-blk read", "MiB/s", "higher", "rig", [300.0, 320.0], [250.0, 260.0],
                  target=1.0))
    r.add(Measure("tcp_tx", "TCP", "MiB/s", "higher", "rig", target=1.0, missing="not measured: no --net"))
    floor = "C KVM_RUN loop"
    r.add(Measure("exit_raw_vm", "exit raw", "µs", "lower", "rig", [10.0], [2.0], reference_name=floor))
    r.add(Measure("exit_loop_vm", "exit loop", "µs", "lower", "rig", [25.0], [2.0], reference_name=floor))
    r.profile = {"exits": {"by_reason": {"io": {"count": 10, "total_ns": 5_000_000}},
                           "by_device": {"pio:0x3f8": {"count": 10, "total_ns": 5_000_000}}},
                 "wall_s": 2.0, "where": "rig"}
    return r


def test_report_rows_show_medians_ratios_and_verdicts():
    text = report.render(sample_results(), report.observations(sample_results()))
    boot = next(line for line in text.splitlines() if line.startswith("| Boot to init"))
    assert "120 (100–140) ms" in boot and "QEMU: 95.0 (90.0–100) ms" in boot
    assert "| 1.26 |" in boot and "≤ 1 ✗" in boot
    read = next(line for line in text.splitlines() if line.startswith("| virtio-blk read"))
    assert "≥ 1 ✓" in read
    assert "not measured: no --net" in text
    assert "- **Host CPU**: Test CPU" in text and "`python -m benchmarks`" in text
    assert "| pio:0x3f8 | 10 | 5.0 |" in text
    assert "a bare Python loop over ember.kvm adds 8.00 µs" in text
    assert "benchmarks.png" in text


def test_results_round_trip_through_json():
    original = sample_results()
    again = from_json(to_json(original))
    assert [m.key for m in again.measures] == [m.key for m in original.measures]
    assert again.measures[0].ratio == original.measures[0].ratio
    assert json.loads(to_json(again)) == json.loads(to_json(original))


def test_chart_is_drawn(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the chart (pip install matplotlib)")
    from benchmarks import chart

    path = chart.draw(sample_results(), tmp_path / "b.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.draw(Results(), tmp_path / "none.png") is None


def test_fmt_keeps_three_figures():
    assert report.fmt(1234.5) == "1234"
    assert report.fmt(12.345) == "12.3"
    assert report.fmt(1.2345) == "1.23"
    assert report.fmt(0.012345) == "0.0123"
    assert report.fmt(0) == "0"


class _FakeConsole:
    def __init__(self, lines):
        self._lines = lines

    def console_lines(self):
        return self._lines

    def console_tail(self):
        return "\n".join(self._lines[-5:])


def test_block_runs_must_copy_every_mib_both_ways():
    from benchmarks.console import BenchError
    from benchmarks.vmbench import block_command, check_dd

    command = block_command(64)
    assert "oflag=direct" in command and "iflag=direct" in command and "count=64" in command
    check_dd("QEMU", _FakeConsole(["BLK-W0", "64+0 records in", "64+0 records out",
                                   "64+0 records in", "64+0 records out"]), 64)
    with pytest.raises(BenchError, match="did not copy"):
        check_dd("QEMU", _FakeConsole(["dd: can't open '/dev/vda': Invalid argument"] * 2), 64)


def test_block_throughput_is_timed_by_the_guests_own_stamps():
    from benchmarks.console import BenchError
    from benchmarks.vmbench import GUEST_STAMP, block_command, guest_rates

    command = block_command(64)
    tags = [f"{GUEST_STAMP} {tag} >/dev/kmsg" for tag in ("w0", "w1", "r0", "r1")]
    positions = [command.index(tag) for tag in tags]
    assert positions == sorted(positions)
    assert positions[0] < command.index("oflag=direct") < positions[1] < positions[2] < command.index(
        "iflag=direct") < positions[3]
    lines = ["BLK-W0", f"[    2.500000] {GUEST_STAMP} w0", f"[    3.000000] {GUEST_STAMP} w1",
             f"[   10.000000] {GUEST_STAMP} r0", f"[   10.250000] {GUEST_STAMP} r1", "EMBER-BENCH-DONE"]
    assert guest_rates("Ember", lines, 64) == pytest.approx((128.0, 256.0))
    with pytest.raises(BenchError, match="stamps are missing"):
        guest_rates("Ember", lines[:3], 64)
    with pytest.raises(BenchError, match="do not advance"):
        guest_rates("QEMU", [*lines[:2], f"[    2.500000] {GUEST_STAMP} w1", *lines[3:]], 64)


def test_a_failed_tcp_run_costs_that_run_and_the_report_says_so(monkeypatch):
    from benchmarks import netbench, vmbench
    from benchmarks.console import BenchError
    from benchmarks.progress import Steps

    calls = []

    def tcp_once(vmm_name, guest, s, tap):
        calls.append(vmm_name)
        if len(calls) == 2:
            raise BenchError("Ember: waited for 'EMBER-BENCH-DONE' but the VMM exited\nconsole tail")
        return 5.0

    class _Tap:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(netbench, "unavailable", lambda: None)
    monkeypatch.setattr(netbench, "TapNetwork", _Tap)
    monkeypatch.setattr(netbench, "tcp_once", tcp_once)
    results = Results()
    vmbench.measure_net(results, None, settings.Settings(runs=2), "rig", Steps(4, "test"))
    (net,) = results.measures
    assert len(calls) == 4 and len(net.ember) + len(net.reference) == 3
    assert net.missing.startswith("failed (TCP ") and "the VMM exited" in net.missing
    assert "a run failed (TCP " in report.row(net)


def test_qemu_names_its_virtio_devices_on_the_command_line():
    qemu = vmm.qemu_argv(vmm.Launch(vmm.Guest("/k", "/i"), "true"))
    assert qemu[qemu.index("-M") + 1] == "microvm,acpi=off"  # the guest kernel has no ACPI


def test_a_failed_measure_is_reported_and_the_suite_goes_on():
    from benchmarks.console import BenchError
    from benchmarks.progress import Steps
    from benchmarks.vmbench import guarded

    def flaky(results, value):
        results.add(Measure("tcp_tx", "TCP", "MiB/s", "higher", "rig", [value], target=1.0))
        raise BenchError("Ember: waited for 'EMBER-BENCH-DONE' but the VMM did not print it\nconsole tail")

    results = Results()
    guarded(results, Steps(1, "test"), "TCP", flaky, 1.5)
    assert results.measures[0].missing == ("failed: Ember: waited for 'EMBER-BENCH-DONE' but the VMM did "
                                           "not print it")
    text = report.render(results)
    assert "✗ a run failed: Ember" in text and "| 1.50 MiB |" not in text and "1.50 MiB/s" in text
