"""The whole machine on the local /dev/kvm, booting tiny 64-bit kernels.

These go through everything a Linux boot does up to the kernel's first
instruction (ELF loading, boot_params, long-mode registers, CPUID, MSRs, the
in-kernel irqchip) and then check that exits reach the right devices and
that each way of ending the VM is reported as such.
"""

from __future__ import annotations

import pytest

from ember import config as cfg
from ember.arch.x86_64 import layout
from ember.devices.virtio.mmio import REG_CONFIG, REG_CONFIG_GENERATION
from ember.errors import EmberError
from ember.machine import MicroVM
from ember.outcome import ExitReason
from tests import tinykernel as tk

pytestmark = pytest.mark.kvm


def boot(tmp_path, code: bytes, *, vcpus: int = 1, timeout: float = 60, entropy: bool = False,
         **options):
    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(tk.elf64(code))
    console = tmp_path / "console.log"
    vm_config = cfg.VmConfig(
        boot_source=cfg.BootSource(kernel_image_path=str(kernel), boot_args="console=ttyS0"),
        machine_config=cfg.MachineConfig(vcpu_count=vcpus, mem_size_mib=64),
        entropy=cfg.Entropy() if entropy else None,
    )
    vm = MicroVM(vm_config, console=f"file:{console}", **options)
    vm.start()
    info = vm.wait(timeout=timeout)
    if info is None:
        vm.stop()
        vm.wait(timeout=10)
        pytest.fail("the tiny kernel did not end the VM in time")
    return vm, info, console.read_bytes()


def test_serial_output_and_i8042_reset(tmp_path):
    vm, info, console = boot(tmp_path, tk.serial_write(b"hello\n") + tk.i8042_reset() + tk.halt_forever())
    assert console == b"hello\n"
    assert info.reason is ExitReason.REBOOT
    exits = vm.metrics()["exits"]
    assert exits["by_reason"]["io"]["count"] >= 7  # six serial bytes and the reset


def test_boot_timer_and_exit_status_mean_poweroff(tmp_path):
    code = tk.boot_complete() + tk.exit_status(7) + tk.i8042_reset() + tk.halt_forever()
    vm, info, _ = boot(tmp_path, code)
    assert info.reason is ExitReason.POWEROFF
    assert info.status == 7 and info.exit_code == 7
    assert vm.boot_time_ns is not None and vm.boot_time_ns > 0
    assert vm.metrics()["exits"]["by_reason"]["mmio"]["count"] == 2


@pytest.mark.parametrize("mirror", [True, False], ids=["mirrored", "exiting"])
def test_virtio_register_loads_need_no_exit_when_mirrored(tmp_path, mirror):
    """The guest reads the rng's window (MagicValue, DeviceID, InterruptStatus): from the
    read-only register page without an exit, or through an exit each when mirroring is off."""
    window = layout.virtio_mmio_window(0)[0]
    code = (tk.print_virtio_identity(window) + tk.load_interrupt_status(window, 5)
            + tk.i8042_reset() + tk.halt_forever())
    vm, info, console = boot(tmp_path, code, entropy=True, mirror_registers=mirror)
    assert info.reason is ExitReason.REBOOT
    assert console == b"virt4"  # "virt", then virtio-rng's DeviceID
    window_exits = vm.metrics()["exits"]["by_device"].get(f"mmio:{window:#x}", {"count": 0})["count"]
    assert window_exits == (0 if mirror else 7)
    report = vm.state_report()  # what SIGUSR2 prints after the stacks (here after the VM ended)
    assert "rng: status 0x0, InterruptStatus 0x0" in report and "queue 0: size 0, not active" in report


def test_stop_ends_a_running_guest(tmp_path):
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(tk.elf64(b"\xeb\xfe"))  # jmp $
    vm = MicroVM(cfg.VmConfig(boot_source=cfg.BootSource(kernel_image_path=str(kernel)),
                              machine_config=cfg.MachineConfig(mem_size_mib=32)), console="none")
    vm.start()
    assert vm.wait(timeout=0.5) is None
    vm.pause()
    assert vm.state == "Paused"
    vm.resume()
    assert vm.state == "Running"
    vm.stop()
    info = vm.wait(timeout=10)
    assert info is not None and info.reason is ExitReason.STOPPED


def test_a_hang_report_says_where_each_vcpu_is_and_the_guest_runs_on(tmp_path):
    """SIGUSR2's report of a stuck VM: each vCPU's registers and run state, read with the
    vCPUs out of KVM_RUN for a moment; the guest then goes on running."""
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(tk.elf64(b"\xeb\xfe"))  # jmp $: the boot vCPU spins; the other waits for INIT/SIPI
    vm = MicroVM(cfg.VmConfig(boot_source=cfg.BootSource(kernel_image_path=str(kernel)),
                              machine_config=cfg.MachineConfig(vcpu_count=2, mem_size_mib=32)), console="none")
    vm.start()
    try:
        assert vm.wait(timeout=0.3) is None
        for _ in range(2):  # a second report finds the VM running again
            report = vm.state_report().splitlines()
            assert report[0].startswith("ember: microVM Running")
            assert f"vCPU 0 at rip {tk.LOAD_ADDR:#x}," in report[1] and "mp_state runnable" in report[1], report
            assert "(interrupts off)" in report[1], report
            assert report[2].startswith("  vCPU 1 at rip") and "mp_state uninitialized" in report[2], report
            assert vm.state == "Running" and vm.wait(timeout=0.2) is None
    finally:
        vm.stop()
        info = vm.wait(timeout=10)
    assert info is not None and info.reason is ExitReason.STOPPED


def test_a_failing_vcpu_thread_ends_the_vm_with_an_error(tmp_path, monkeypatch):
    from ember import vcpu_loop

    def broken_run(self, should_return):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(vcpu_loop.VcpuLoop, "run", broken_run)
    _, info, _ = boot(tmp_path, tk.halt_forever())
    assert info.reason is ExitReason.ERROR
    assert "decoder bug" in info.detail
    assert info.exit_code == 70


def test_a_running_drive_takes_new_media_and_the_guest_sees_the_new_size(tmp_path):
    """update_drive (PATCH /drives with path_on_host): the guest-visible config space
    (the register page) shows the new capacity under a new generation; a file that
    cannot be opened, or an unknown drive, changes nothing."""
    kernel = tmp_path / "spin.elf"
    kernel.write_bytes(tk.elf64(b"\xeb\xfe"))  # jmp $
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(bytes(1 << 20))
    second.write_bytes(bytes(3 << 20))
    drives = [cfg.Drive(drive_id="data", path_on_host=str(first), is_root_device=False),
              cfg.Drive(drive_id="spare", path_on_host=str(first), is_root_device=False, is_read_only=True)]
    vm = MicroVM(cfg.VmConfig(boot_source=cfg.BootSource(kernel_image_path=str(kernel)),
                              machine_config=cfg.MachineConfig(mem_size_mib=32), drives=drives),
                 console="none")
    vm.start()
    try:
        mirror = vm.virtio_devices["block:data"].mirror
        capacity = lambda: mirror.word(REG_CONFIG) | mirror.word(REG_CONFIG + 4) << 32  # noqa: E731 (5.2.4)
        generation = mirror.word(REG_CONFIG_GENERATION)
        assert capacity() == 2048
        vm.update_drive("data", str(second))
        assert capacity() == 6144 and mirror.word(REG_CONFIG_GENERATION) != generation
        assert vm.config.drives[0].path_on_host == str(second)
        with pytest.raises(EmberError, match="cannot open"):
            vm.update_drive("data", str(tmp_path / "missing.img"))
        with pytest.raises(EmberError, match="no drive"):
            vm.update_drive("nope", str(first))
        assert capacity() == 6144 and vm.config.drives[0].path_on_host == str(second)
        vm.update_drive("spare", str(second))
        metrics = vm.metrics()  # Firecracker's groups: per drive, and their sum
        assert (metrics["block_data"]["update_count"], metrics["block_data"]["update_fails"]) == (1, 1)
        assert metrics["block_spare"]["update_count"] == 1
        assert metrics["block"]["update_count"] == 2 and metrics["block"]["update_fails"] == 1
    finally:
        vm.stop()
        vm.wait(timeout=10)
