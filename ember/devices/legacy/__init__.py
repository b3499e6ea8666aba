"""Legacy PC devices: the 16550A serial ports, the i8042 controller (reset) and
Firecracker's boot-timer signal page. See each module for the spec it follows."""

from ember.devices.legacy.boot_timer import BootTimer, BootTimerState
from ember.devices.legacy.i8042 import I8042, I8042State
from ember.devices.legacy.serial import Serial, SerialState

__all__ = ["BootTimer", "BootTimerState", "I8042", "I8042State", "Serial", "SerialState"]
