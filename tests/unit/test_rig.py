"""Unit tests of the rig's pure parts: module ordering, command encoding, host checks."""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import EmberError
from ember.rig.command import command_script, init_settings, rig_environment
from ember.rig.hostcheck import classify, cpu_flags
from ember.rig.kernel import extract_vmlinux, parse_depends, release_of
from ember.rig.modules import decompress_module, load_order, module_name, parse_builtin, parse_modules_dep
from ember.rig.qemu import RigRun, host_tsc_khz, qemu_argv, qemu_escape

MODULES_DEP = textwrap.dedent("""\
    kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
    kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko \
        kernel/virt/lib/irqbypass.ko
    kernel/drivers/crypto/ccp/ccp.ko:
    kernel/virt/lib/irqbypass.ko:
    kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
    kernel/net/9p/9pnet.ko.xz:
    kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
    kernel/fs/netfs/netfs.ko:
    kernel/drivers/a.ko: kernel/drivers/b.ko
    kernel/drivers/b.ko: kernel/drivers/a.ko
""")


def test_module_name_normalises_dashes_and_suffixes() -> None:
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("kernel/fs/9p/9p.ko.xz") == "9p"
    assert module_name("x/virtio_ring.ko.zst") == "virtio_ring"


def test_load_order_puts_dependencies_first_once() -> None:
    dep = parse_modules_dep(MODULES_DEP)
    order = load_order(["kvm_amd", "9p", "kvm"], dep, set())
    names = [module_name(p) for p in order]
    assert names == ["ccp", "irqbypass", "kvm", "kvm_amd", "9pnet", "netfs", "fscache", "9p"]
    for path in order:
        for needed in dep[module_name(path)][1]:
            assert order.index(needed) < order.index(path)


def test_builtin_modules_are_skipped_and_unknown_ones_named() -> None:
    dep = parse_modules_dep(MODULES_DEP)
    builtin = parse_builtin("kernel/drivers/virtio/virtio_mmio.ko\n")
    assert load_order(["virtio_mmio", "kvm"], dep, builtin) == [
        "kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko"]
    with pytest.raises(EmberError, match="'nosuch'"):
        load_order(["nosuch"], dep, builtin)


def test_dependency_cycle_is_an_error() -> None:
    with pytest.raises(EmberError, match="cycle"):
        load_order(["a"], parse_modules_dep(MODULES_DEP), set())


def test_malformed_modules_dep_line_is_rejected() -> None:
    with pytest.raises(EmberError, match="line 2"):
        parse_modules_dep("a.ko:\nno colon here\n")


def test_decompress_module_handles_plain_and_xz() -> None:
    elf = b"\x7fELF" + bytes(100)
    assert decompress_module(elf) == elf
    assert decompress_module(lzma.compress(elf)) == elf
    with pytest.raises(EmberError):
        decompress_module(b"garbage")


def test_extract_vmlinux_finds_the_xz_payload() -> None:
    elf = b"\x7fELF" + os.urandom(64)
    assert extract_vmlinux(b"MZ setup code" + lzma.compress(elf) + b"trailer") == elf
    with pytest.raises(EmberError):
        extract_vmlinux(b"no payload")


def test_apt_depends_parsing() -> None:
    out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert parse_depends(out) == "linux-image-6.1.0-56-amd64"
    assert release_of("linux-image-6.1.0-56-amd64-unsigned") == "6.1.0-56-amd64"
    with pytest.raises(EmberError):
        parse_depends("linux-image-amd64\n")


def _run_script(script: str, tmp_path: Path) -> list[str]:
    """Run a command script as the rig's init does (env -i sh) and return the argv it exec'd."""
    path = tmp_path / "command.sh"
    path.write_text(script)
    done = subprocess.run(["env", "-i", "/bin/sh", str(path)], capture_output=True, check=True)
    return json.loads(done.stdout)


ECHO_ARGV = [sys.executable, "-c",
             "import json,os,sys; print(json.dumps([os.getcwd(), os.environ.get('X', ''), *sys.argv[1:]]))"]

ARG_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.text(ARG_CHARS, max_size=12), max_size=5), value=st.text(ARG_CHARS, max_size=12))
def test_command_script_round_trips_argv_env_and_cwd(tmp_path_factory: pytest.TempPathFactory,
                                                     words: list[str], value: str) -> None:
    tmp = tmp_path_factory.mktemp("odd dir 'quoted' $HOME")
    script = command_script(ECHO_ARGV + words, str(tmp), {"X": value, "PATH": "/usr/bin:/bin"})
    assert _run_script(script, tmp) == [str(tmp), value, *words]


def test_command_script_starts_the_background_command_beside_the_main_one(tmp_path: Path) -> None:
    side = ["/bin/sh", "-c", f"echo held > {tmp_path / 'side'}; sleep 0.2"]
    path = tmp_path / "c.sh"
    path.write_text(command_script(["/bin/sh", "-c", "sleep 0.5; echo main"], str(tmp_path), {}, background=side))
    done = subprocess.run(["/bin/sh", str(path)], capture_output=True, text=True, timeout=30)
    assert done.stdout == "main\n" and (tmp_path / "side").read_text() == "held\n"


def test_command_script_reports_a_missing_cwd(tmp_path: Path) -> None:
    path = tmp_path / "c.sh"
    path.write_text(command_script(["true"], "/nonexistent/dir", {}))
    assert subprocess.run(["/bin/sh", str(path)], capture_output=True).returncode == 126


def test_rig_environment_passes_a_safe_subset() -> None:
    env = rig_environment({"PATH": "/bin", "SECRET_TOKEN": "x", "EMBER_FOO": "1", "HOME": "/root",
                           "XDG_CACHE_HOME": "/ci/cache"}, {"EXTRA": "y"})
    assert env == {"PATH": "/bin", "EMBER_FOO": "1", "HOME": "/root", "XDG_CACHE_HOME": "/ci/cache", "EXTRA": "y",
                   "EMBER_IN_RIG": "1", "PYTHONUNBUFFERED": "1"}  # the cache: the rig finds the host's images
    with pytest.raises(ValueError):
        rig_environment({}, {"BAD NAME": "1"})
    with pytest.raises(ValueError):
        command_script([], "/", {})


def test_init_settings_quote_the_out_dir() -> None:
    assert init_settings("/tmp/a b'c") == "EMBER_RIG_OUT='/tmp/a b'\"'\"'c'\n"
    assert init_settings(None) == "EMBER_RIG_OUT=''\n"


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme svm npt lm\ncpu MHz\t\t: 2100.000\n"


def test_cpu_flags_and_classification() -> None:
    flags = cpu_flags(CPUINFO)
    assert {"svm", "npt"} <= flags
    assert classify(flags, kvm_usable=True, pvm_loaded=False).kind == "hardware"
    assert classify(flags, kvm_usable=True, pvm_loaded=False).can_boot_linux
    assert classify(flags, kvm_usable=False, pvm_loaded=False).kind == "none"
    pvm = classify(set(), kvm_usable=True, pvm_loaded=True)
    assert (pvm.kind, pvm.can_boot_linux) == ("pvm", False)
    assert classify({"vmx"}, True, False).detail.startswith("Intel VT-x")
    assert classify(set(), False, False) == classify(cpu_flags(""), False, False)
    assert classify(set(), False, False).kind == "none"


def test_tsc_khz_from_cpuinfo() -> None:
    assert host_tsc_khz(CPUINFO) == 2_100_000
    assert host_tsc_khz("") > 0


def test_qemu_argv_escapes_paths_and_adds_the_out_share(tmp_path: Path) -> None:
    run = RigRun(Path("/k/vmlinux"), Path("/k/rig.cpio"), tmp_path / "run,dir", out_dir=Path("/o,ut"))
    argv = qemu_argv(run, 5, 6, 2_000_000)
    assert qemu_escape("a,b") == "a,,b"
    joined = " ".join(argv)
    assert "path=/o,,ut" in joined and "mount_tag=out" in joined
    assert "path=/dev/fd/5" in joined and "path=/dev/fd/6" in joined
    assert "tsc_early_khz=2000000" in argv[argv.index("-append") + 1]
    assert "-nodefaults" in argv and argv[argv.index("-nic") + 1] == "none"


def test_snapshot_table_and_disks(tmp_path: Path) -> None:
    from ember.rig.command import snapshot_table

    assert snapshot_table(["/opt/py", "/a b/venv"]) == "tree0 /opt/py\ntree1 /a b/venv\n"
    with pytest.raises(ValueError):
        snapshot_table(["/bad\npath"])
    run = RigRun(Path("/k/vmlinux"), Path("/k/rig.cpio"), tmp_path, snapshots=[(Path("/opt/py"), Path("/c/x,y.ext4"))])
    joined = " ".join(qemu_argv(run, 5, 6, 1))
    assert "file=/c/x,,y.ext4,if=none,format=raw,readonly=on,id=tree0" in joined
    assert "virtio-blk-device,drive=tree0,serial=tree0" in joined


def test_tree_fingerprint_follows_directory_changes(tmp_path: Path) -> None:
    from ember.rig.trees import survey

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_bytes(b"x" * 5000)
    key, size, inodes = survey(tmp_path)
    assert size == 8192 and inodes == 3
    assert survey(tmp_path)[0] == key
    (tmp_path / "pkg" / "new.py").write_text("")
    os.utime(tmp_path / "pkg", ns=(1, 1))
    assert survey(tmp_path)[0] != key


_FAKE_RIG = textwrap.dedent("""
    import os, sys, time
    ctl = sys.argv[1]
    boots = os.path.join(ctl, "boots")
    count = int(open(boots).read()) + 1 if os.path.exists(boots) else 1
    open(boots, "w").write(str(count))
    if count <= int(sys.argv[2]):
        time.sleep(60)  # this boot stalls before the command: no 'started'
    open(os.path.join(ctl, "started"), "w").close()
    time.sleep(float(sys.argv[4]))  # the command's own work
    os.write(int(sys.argv[3]), b"the command ran\\n")
    open(os.path.join(ctl, "status"), "w").write("7")
""")


def _fake_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stalls: int, work_s: float = 0.0) -> RigRun:
    """A RigRun whose 'QEMU' stalls before the command for its first ``stalls`` boots."""
    from ember.rig import qemu

    run = RigRun(Path("/k/vmlinux"), Path("/k/rig.cpio"), tmp_path)
    run.ctl_dir.mkdir()
    monkeypatch.setattr(qemu, "QEMU", sys.executable)
    monkeypatch.setattr(qemu, "BOOT_LIMIT_S", 1.0)
    monkeypatch.setattr(qemu, "WATCH_POLL_S", 0.1)
    monkeypatch.setattr(qemu, "cpu_report", lambda *a: "(cpu report)")
    monkeypatch.setattr(qemu, "qemu_argv", lambda r, out_fd, err_fd, tsc: [
        sys.executable, "-c", _FAKE_RIG, str(r.ctl_dir), str(stalls), str(out_fd), str(work_s)])
    return run


def test_a_rig_boot_that_stalls_before_the_command_is_booted_again(tmp_path, monkeypatch, capsys) -> None:
    from ember.rig import qemu

    run = _fake_rig(tmp_path, monkeypatch, stalls=1)
    status = qemu.boot(run, 30.0, sys.stdout, sys.stderr)
    out, err = capsys.readouterr()
    assert status == 7 and (run.ctl_dir / "boots").read_text() == "2"
    assert "the command ran" in out
    assert "had not reached its init's command after 1 s" in err and "booting it again (attempt 2 of 2)" in err


def test_a_rig_whose_boots_all_stall_times_out(tmp_path, monkeypatch, capsys) -> None:
    from ember.rig import qemu

    run = _fake_rig(tmp_path, monkeypatch, stalls=2)
    assert qemu.boot(run, 30.0, sys.stdout, sys.stderr) == qemu.TIMEOUT_STATUS
    assert (run.ctl_dir / "boots").read_text() == "2"
    assert "the command ran" not in capsys.readouterr().out


def test_a_command_that_started_is_never_booted_twice(tmp_path, monkeypatch) -> None:
    from ember.rig import qemu

    run = _fake_rig(tmp_path, monkeypatch, stalls=0, work_s=2.5)  # runs on well past the boot limit
    assert qemu.boot(run, 30.0, sys.stdout, sys.stderr) == 7
    assert (run.ctl_dir / "boots").read_text() == "1"
