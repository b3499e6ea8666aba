"""`ember` command line: bad input is one line on stderr and a non-zero exit, nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import tinykernel as tk


def ember(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_kernel(tmp_path):
    assert_one_line_error(ember("run", "--kernel", str(tmp_path / "nope")), "kernel image not found")


def test_corrupt_kernel(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF" + bytes(100))
    assert_one_line_error(ember("run", "--kernel", str(bad)), str(bad))


def test_truncated_kernel(tmp_path):
    image = tmp_path / "cut.elf"
    image.write_bytes(tk.elf64(tk.halt_forever())[:0x800])
    assert_one_line_error(ember("run", "--kernel", str(image)), str(image))


def test_too_little_memory_for_kernel_and_initrd(tmp_path):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(tk.elf64(tk.halt_forever()))
    initrd = tmp_path / "big.cpio"
    with open(initrd, "wb") as f:
        f.truncate(40 << 20)
    assert_one_line_error(ember("run", "--kernel", str(kernel), "--initrd", str(initrd), "--mem", "32"),
                          "memory")


def test_unknown_option():
    assert_one_line_error(ember("run", "--frobnicate"), "unrecognized arguments: --frobnicate")


@pytest.mark.parametrize("args, words", [
    (["--vcpus", "0"], "--vcpus"),
    (["--mem", "1"], "--mem"),
    (["--console", "serial"], "invalid console"),
    (["--drive", "/nonexistent.img"], "not found"),
])
def test_bad_values(tmp_path, args, words):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(tk.elf64(tk.halt_forever()))
    assert_one_line_error(ember("run", "--kernel", str(kernel), *args), words)


def test_kvm_device_missing_is_one_line(tmp_path):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(tk.elf64(tk.halt_forever()))
    code = ("import sys; from ember import config as c; from ember.machine import MicroVM; "
            f"vm = MicroVM(c.VmConfig(boot_source=c.BootSource(kernel_image_path={str(kernel)!r})), "
            "kvm_path='/nonexistent/kvm', console='none'); vm.start()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "/nonexistent/kvm" in result.stderr.strip().splitlines()[-1]


def test_device_rows_show_each_device_and_only_its_nonzero_counters():
    from ember.cli import device_rows

    metrics = {"state": "Exited", "exits": {"total": 9}, "uart": {"tx_bytes": 5},
               "block_drive0": {"read_count": 3, "read_bytes": 3 << 20, "write_count": 0},
               "block": {"read_count": 3, "read_bytes": 3 << 20, "write_count": 0},
               "net_eth0": {"rx_packets_count": 0}, "entropy": {"entropy_bytes": 64}}
    assert device_rows(metrics) == [("block_drive0", "read_count 3, read_bytes 3.0 MiB"),
                                    ("net_eth0", "idle"), ("entropy", "entropy_bytes 64")]
