"""Asking a stalled rig's QEMU monitor where its CPUs are (ember/rig/monitor.py), against a fake monitor."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from ember.rig import monitor

# Shaped like QEMU 7.2's reply to `info registers -a` (other registers cut).
REGISTERS = (
    "\r\nCPU#0\r\n"
    "RAX=ffff8881002628d8 RBX=ffff88813bc31c40 RCX=0000000000000000 RDX=000000294f55f037\r\n"
    "RIP=ffffffffc0a41010 RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n"
    "EFER=0000000000001d01\r\n"
    "\r\nCPU#1\r\n"
    "RIP=ffffffff81a5267b RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "EFER=0000000000001d01\r\n"
    "\r\nCPU#2\r\n"
    "RIP=ffffffff81002fb7 RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n"
    "EFER=0000000000000d01\r\n"
)
KALLSYMS = """ffffffff81a52600 T default_idle
ffffffff81a52700 t cpu_idle_poll
ffffffffc0a41000 t svm_vcpu_run\t[kvm_amd]
ffffffffc0a41100 t svm_handle_exit\t[kvm_amd]
ffffffff81a52680 d some_data
"""


def fake_monitor(path: Path, replies: int) -> threading.Thread:
    """A Unix-socket HMP: banner and prompt, then per command its echo and REGISTERS."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        with server:
            for _ in range(replies):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
                    command = conn.recv(4096).decode().strip()
                    conn.sendall(f"\x1b[K{command}".encode() + REGISTERS.encode() + b"(qemu) ")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_registers_are_parsed_per_cpu():
    samples = monitor.parse_registers(REGISTERS)
    assert [(s.cpu, s.rip, s.halted, s.svme) for s in samples] == [
        (0, 0xFFFFFFFFC0A41010, False, True),
        (1, 0xFFFFFFFF81A5267B, True, True),
        (2, 0xFFFFFFFF81002FB7, False, False),  # EFER without SVME: a nested guest, or no VM open
    ]


def test_symbols_name_kernel_and_module_text():
    symbols = monitor.Symbols(KALLSYMS.splitlines())
    assert symbols.name(0xFFFFFFFF81A5267B) == "default_idle+0x7b"  # data symbols are not text
    assert symbols.name(0xFFFFFFFFC0A41010) == "kvm_amd:svm_vcpu_run+0x10"
    assert symbols.name(0x1000) == "0x1000"


def test_the_report_names_where_each_cpu_was(tmp_path):
    sock = tmp_path / "monitor.sock"
    server = fake_monitor(sock, replies=3)
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(KALLSYMS)
    report = monitor.cpu_report(sock, kallsyms, samples=3, interval_s=0)
    server.join(timeout=5)
    assert "over 3 samples" in report
    assert "CPU 0: kvm_amd:svm_vcpu_run+0x10 ×3" in report
    assert "CPU 1: halted in default_idle+0x7b ×3" in report
    assert "CPU 2: 0xffffffff81002fb7 (SVME off) ×3" in report  # no rig symbol below it


def test_a_monitor_that_is_not_there_is_said_so(tmp_path):
    report = monitor.cpu_report(tmp_path / "absent.sock", tmp_path / "kallsyms", samples=2, interval_s=0)
    assert report.startswith("(the rig's monitor did not answer")
