"""Interrupt lines backed by KVM irqfd on the in-kernel IOAPIC.

A device raises its interrupt by writing an eventfd; KVM injects the edge on
the GSI without any ioctl or vCPU exit (KVM API: KVM_IRQFD). This is the
machine's implementation of ``ember.devices.irq.IrqLine``.
"""

from __future__ import annotations

import os


class IrqfdLine:
    """One GSI of the in-kernel irqchip, driven through an eventfd."""

    def __init__(self, vm, gsi: int) -> None:
        self.gsi = gsi
        self._vm = vm
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.register_irqfd(self._fd, gsi)
        self.count = 0

    def trigger(self) -> None:
        """Inject one edge on the GSI (safe from any thread)."""
        self.count += 1
        os.eventfd_write(self._fd, 1)

    def set_level(self, high: bool) -> None:
        """Level changes go through KVM_IRQ_LINE (rare: legacy devices only)."""
        self._vm.irq_line(self.gsi, 1 if high else 0)

    def close(self) -> None:
        try:
            self._vm.unregister_irqfd(self._fd, self.gsi)
        except Exception:  # the VM may already be gone
            pass
        os.close(self._fd)
