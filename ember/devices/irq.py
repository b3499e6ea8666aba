"""The interrupt line a device raises towards the guest.

Devices see only this protocol; the machine backs it with a KVM irqfd (an
eventfd write, thread-safe, no ioctl on the device's path), see the KVM API
documentation, section 4.75 KVM_IRQFD. Edge-triggered ISA lines use
``trigger``; level-triggered lines use ``set_level``.
"""

from typing import Protocol, runtime_checkable


@runtime_checkable
class IrqLine(Protocol):
    """One interrupt input of the guest's interrupt controller."""

    def trigger(self) -> None:
        """Send one edge (a pulse) on the line."""
        ...

    def set_level(self, high: bool) -> None:
        """Drive a level-triggered line high (asserted) or low."""
        ...


class NullIrqLine:
    """A line wired to nothing: for devices whose interrupt is not routed."""

    def trigger(self) -> None:
        """Drop the pulse."""

    def set_level(self, high: bool) -> None:
        """Ignore the level."""
