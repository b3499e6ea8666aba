"""Which host module an address lies in, and the vCPU report that uses it."""

from types import SimpleNamespace

from ember import vcpu_loop
from ember.host_modules import HOST_MODULE_MARK, host_module_at, module_ranges

PROC_MODULES = """kvm_amd 163840 0 - Live 0xffffffffc056f000
kvm 1146880 1 kvm_amd, Live 0xffffffffc0456000
ccp 118784 1 kvm_amd, Live 0x0000000000000000
broken line
"""


def test_module_ranges_skip_hidden_and_malformed_lines():
    assert module_ranges(PROC_MODULES) == [(0xffffffffc056f000, 0xffffffffc056f000 + 163840, "kvm_amd"),
                                           (0xffffffffc0456000, 0xffffffffc0456000 + 1146880, "kvm")]


def test_host_module_at_finds_the_module_or_none(tmp_path):
    path = tmp_path / "modules"
    path.write_text(PROC_MODULES)
    assert host_module_at(0xffffffffc058120c, path) == "kvm_amd"
    assert host_module_at(0xffffffffc0456000, path) == "kvm"
    assert host_module_at(0xffffffffc0597000, path) is None  # kvm_amd's end is outside it
    assert host_module_at(0xffffffff81000000, path) is None
    assert host_module_at(0xffffffffc058120c, tmp_path / "missing") is None


class _Vcpu:
    vcpu_id = 0

    def __init__(self, rip):
        self.rip = rip

    def get_regs(self):
        return SimpleNamespace(rip=self.rip, rsp=0xffffc9000086bd20, rflags=0x10246)

    def get_sregs(self):
        idt = SimpleNamespace(base=0xfffffe0000000000, limit=0xfff)
        return SimpleNamespace(cr0=0x80050033, cr3=0x100914000, idt=idt)

    def get_mp_state(self):
        return 0


def test_a_vcpu_at_the_hosts_rip_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "modules"
    path.write_text(PROC_MODULES)
    monkeypatch.setattr(vcpu_loop, "host_module_at", lambda rip: host_module_at(rip, path))
    line = vcpu_loop.describe_vcpu(_Vcpu(0xffffffffc058120c))
    assert line.startswith("vCPU 0 at rip 0xffffffffc058120c") and f"{HOST_MODULE_MARK} kvm_amd" in line
    assert HOST_MODULE_MARK not in vcpu_loop.describe_vcpu(_Vcpu(0xffffffff8104a2b0))
