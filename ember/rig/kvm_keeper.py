"""Holds one KVM VM (in-kernel irqchip, one vCPU, never run) open for the rig's whole life.

KVM flips kernel static keys when the first VM or vCPU appears and the last one
goes (preempt notifiers in ``__schedule``, the LAPIC keys), and the kernel patches
its own text for each flip through int3 breakpoints. Under QEMU's TCG that patching
has livelocked the rig: both emulated CPUs caught looping in ``__schedule`` and
``exc_int3`` (sampled with monitor.py). With this VM open the keys never return
to zero, so starting and ending Ember's VMs patches nothing. Run as
``python -m ember.rig.kvm_keeper`` in the background of the rig's command.
"""

from __future__ import annotations

import signal

from ember.kvm import Kvm


def hold() -> None:
    """Create the VM and its vCPU, then sleep until killed."""
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    held = [kvm, vm, vm.create_vcpu(0)]  # referenced for good: closing any would flip the keys back
    while held:
        signal.pause()


if __name__ == "__main__":
    hold()
