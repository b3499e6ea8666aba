"""Ways a guest can end the VM, on KVM with hardware-style execution.

The tiny kernel faults with no IDT: real KVM reports KVM_EXIT_SHUTDOWN,
which Ember reports as a triple fault (exit status 65). (PVM's instruction
emulator cannot deliver that fault, so this lives in the system tier.)
"""

from __future__ import annotations

import pytest

from ember import config as cfg
from ember.machine import MicroVM
from ember.outcome import ExitReason
from ember.rig.pytest_tiers import EMULATOR_FAULT_MARK
from tests import tinykernel as tk

pytestmark = pytest.mark.system


def test_triple_fault_ends_the_vm_as_triple_fault(tmp_path):
    kernel = tmp_path / "triple.elf"
    kernel.write_bytes(tk.elf64(tk.serial_write(b"x") + tk.triple_fault()))
    vm = MicroVM(cfg.VmConfig(boot_source=cfg.BootSource(kernel_image_path=str(kernel)),
                              machine_config=cfg.MachineConfig(mem_size_mib=64)), console="none")
    vm.start()
    info = vm.wait(timeout=60)
    assert info is not None, "the VM did not end"
    assert info.reason is ExitReason.TRIPLE_FAULT, info
    assert info.exit_code == 65
    # The rig reruns a test whose guest faulted by surprise once; it knows the fault by this text.
    assert EMULATOR_FAULT_MARK in info.detail and "on vCPU 0 at rip" in info.detail, info.detail
