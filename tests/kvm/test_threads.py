"""vCPUs in threads: concurrent KVM_RUN, GIL release and signal kicks (EINTR)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from ember.kvm import structs as s
from tests.guests import DX, KVM_SKIP_REASON, Asm, MicroGuest, kvm_usable

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not kvm_usable(), reason=KVM_SKIP_REASON)]

ID_PORT = 0x10


def test_two_vcpus_run_concurrently_and_report_their_own_id():
    code = Asm().mov(DX, ID_PORT).out(1).hlt().bytes()
    reports: dict[int, list[int]] = {0: [], 1: []}
    results: dict[int, int] = {}

    def run(index: int) -> None:
        def on_io(is_write, port, size, data):
            assert is_write and port == ID_PORT
            reports[index].append(data[0])
        results[index] = guest.run_until_exit(index, on_io=on_io)

    with MicroGuest(code, vcpus=2) as guest:
        for index in range(2):
            guest.set_reg("rax", index, vcpu=index)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results == {0: s.KVM_EXIT_HLT, 1: s.KVM_EXIT_HLT}
        assert reports == {0: [0], 1: [1]}


def test_blocking_kvm_run_releases_gil_and_signal_gives_exit_intr():
    """With an in-kernel irqchip, HLT blocks inside KVM_RUN until a signal kicks it."""
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    outcome: list[int] = []
    try:
        with MicroGuest(Asm().hlt().bytes(), irqchip=True) as guest:
            thread = threading.Thread(target=lambda: outcome.append(guest.vcpus[0].run()))
            thread.start()
            spins, deadline = 0, time.monotonic() + 0.3
            while time.monotonic() < deadline:
                spins += 1
            assert thread.is_alive(), "HLT with an in-kernel irqchip must block in KVM_RUN"
            for _ in range(50):
                signal.pthread_kill(thread.ident, signal.SIGUSR1)
                thread.join(timeout=0.1)
                if not thread.is_alive():
                    break
            assert not thread.is_alive()
            assert outcome == [s.KVM_EXIT_INTR]
            assert spins > 1000  # the main thread ran while the vCPU was in KVM_RUN
    finally:
        signal.signal(signal.SIGUSR1, previous)
