"""The KVM API layer: ioctl numbers, ABI structures and Kvm/Vm/Vcpu objects.

Follows Documentation/virt/kvm/api.rst (Linux 6.1). Nothing here knows about
machines or devices; see DESIGN.md, layer 1.
"""

from ember.kvm import structs
from ember.kvm.ioctl import KvmError
from ember.kvm.system import Kvm, Vcpu, Vm, read_stats_fd

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "structs", "read_stats_fd"]
