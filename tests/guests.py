"""Micro-guests: a few bytes of real-mode x86 code run directly on /dev/kvm.

A tiny 16-bit encoder (Intel SDM vol. 2 opcodes, no assembler needed) and
MicroGuest, which builds a VM with RAM at gpa 0, loads code at LOAD_ADDR,
enters it in real mode and runs it until an exit the caller must see.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Callable

from ember.kvm import Kvm, Vcpu
from ember.kvm import structs as s
from ember.memory import GuestMemory

log = logging.getLogger(__name__)

LOAD_ADDR = 0x1000
STACK_TOP = 0x8000
DEFAULT_MEM_SIZE = 0x10000
TSS_ADDR = 0xFFFBD000
LOOP_DONE_PORT = 0xF0
LOOP_DONE_VALUE = 0x42
OPERAND_SIZE = 0x66  # prefix: 32-bit operand in 16-bit code
ES_PREFIX = 0x26

# 16-bit register numbers (ModRM / +r encoding)
AX, CX, DX, BX, SP, BP, SI, DI = range(8)


class Asm:
    """A minimal real-mode assembler: each method appends one instruction."""

    def __init__(self) -> None:
        self.code = bytearray()

    def here(self) -> int:
        return len(self.code)

    def _emit(self, *parts: int | bytes) -> "Asm":
        for part in parts:
            self.code += part if isinstance(part, bytes) else bytes([part])
        return self

    def mov(self, reg: int, imm: int) -> "Asm":
        """mov r16, imm16 (B8+r iw)."""
        return self._emit(0xB8 + reg, struct.pack("<H", imm & 0xFFFF))

    def mov32(self, reg: int, imm: int) -> "Asm":
        """mov r32, imm32 (66 B8+r id)."""
        return self._emit(OPERAND_SIZE, 0xB8 + reg, struct.pack("<I", imm & 0xFFFFFFFF))

    def mov_al(self, imm: int) -> "Asm":
        return self._emit(0xB0, imm & 0xFF)

    def out(self, size: int = 1) -> "Asm":
        """out dx, al/ax/eax (EE / EF / 66 EF)."""
        return self._emit(*{1: (0xEE,), 2: (0xEF,), 4: (OPERAND_SIZE, 0xEF)}[size])

    def in_(self, size: int = 1) -> "Asm":
        """in al/ax/eax, dx (EC / ED / 66 ED)."""
        return self._emit(*{1: (0xEC,), 2: (0xED,), 4: (OPERAND_SIZE, 0xED)}[size])

    def store(self, addr: int, size: int = 1, es: bool = False) -> "Asm":
        """mov [moffs16], al/ax/eax (A2 / A3 / 66 A3), optionally es-relative."""
        prefix = (ES_PREFIX,) if es else ()
        opcode = {1: (0xA2,), 2: (0xA3,), 4: (OPERAND_SIZE, 0xA3)}[size]
        return self._emit(*prefix, *opcode, struct.pack("<H", addr))

    def load(self, addr: int, size: int = 1, es: bool = False) -> "Asm":
        """mov al/ax/eax, [moffs16] (A0 / A1 / 66 A1), optionally es-relative."""
        prefix = (ES_PREFIX,) if es else ()
        opcode = {1: (0xA0,), 2: (0xA1,), 4: (OPERAND_SIZE, 0xA1)}[size]
        return self._emit(*prefix, *opcode, struct.pack("<H", addr))

    def inc(self, reg: int) -> "Asm":
        return self._emit(0x40 + reg)

    def dec(self, reg: int, wide: bool = False) -> "Asm":
        """dec r16 (48+r) or dec r32 (66 48+r)."""
        return self._emit(*((OPERAND_SIZE,) if wide else ()), 0x48 + reg)

    def _rel8(self, opcode: int, target: int) -> "Asm":
        rel = target - (self.here() + 2)
        if not -128 <= rel <= 127:
            raise ValueError("jump target out of rel8 range")
        return self._emit(opcode, rel & 0xFF)

    def jnz(self, target: int) -> "Asm":
        return self._rel8(0x75, target)

    def jmp(self, target: int) -> "Asm":
        return self._rel8(0xEB, target)

    def loop(self, target: int) -> "Asm":
        """loop rel8 (E2): dec cx; jnz."""
        return self._rel8(0xE2, target)

    def hlt(self) -> "Asm":
        return self._emit(0xF4)

    def bytes(self) -> bytes:
        return bytes(self.code)


def loop_guest(iterations: int, port: int = LOOP_DONE_PORT) -> bytes:
    """Code that counts ECX down from ``iterations``, then outs 0x42 to ``port`` and halts.

    The loop body is two instructions (dec ecx; jnz), so a run executes about
    2 * iterations guest instructions.
    """
    asm = Asm().mov32(CX, iterations)
    if iterations > 0:
        top = asm.here()
        asm.dec(CX, wide=True).jnz(top)
    return asm.mov(DX, port).mov_al(LOOP_DONE_VALUE).out(1).hlt().bytes()


IoHandler = Callable[[bool, int, int, memoryview], None]
MmioHandler = Callable[[int, bool, memoryview], None]


class MicroGuest:
    """A VM with ``mem_size`` bytes of RAM at 0 and ``code`` loaded at LOAD_ADDR."""

    def __init__(self, code: bytes, mem_size: int = DEFAULT_MEM_SIZE, vcpus: int = 1, *,
                 irqchip: bool = False, track_dirty: bool = False,
                 kvm_path: str = "/dev/kvm") -> None:
        self.kvm = Kvm(kvm_path)
        self.vm = self.kvm.create_vm()
        if irqchip:
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.create_irqchip()
        self.memory = GuestMemory([(0, mem_size)])
        self.memory.register(self.vm, track_dirty=track_dirty)
        self.memory.write(LOAD_ADDR, code)
        self.vcpus: list[Vcpu] = [self._make_vcpu(i) for i in range(vcpus)]

    def _make_vcpu(self, vcpu_id: int) -> Vcpu:
        vcpu = self.vm.create_vcpu(vcpu_id)
        sregs = vcpu.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment = getattr(sregs, name)
            segment.base = 0
            segment.selector = 0
        vcpu.set_sregs(sregs)
        regs = s.kvm_regs(rip=LOAD_ADDR, rsp=STACK_TOP, rflags=0x2)
        vcpu.set_regs(regs)
        return vcpu

    def set_segment_base(self, name: str, base: int, vcpu: int = 0) -> None:
        """Point a segment's hidden base anywhere (e.g. es at an MMIO hole)."""
        sregs = self.vcpus[vcpu].get_sregs()
        getattr(sregs, name).base = base
        self.vcpus[vcpu].set_sregs(sregs)

    def set_reg(self, name: str, value: int, vcpu: int = 0) -> None:
        regs = self.vcpus[vcpu].get_regs()
        setattr(regs, name, value)
        self.vcpus[vcpu].set_regs(regs)

    def run_until_exit(self, vcpu: int = 0, *, on_io: IoHandler | None = None,
                       on_mmio: MmioHandler | None = None, max_exits: int = 10_000) -> int:
        """Run until an exit not consumed by a handler; return its exit reason.

        on_io(is_write, port, size, data) / on_mmio(addr, is_write, data) consume
        IO / MMIO exits (fill ``data`` for reads); without a handler they return.
        """
        cpu = self.vcpus[vcpu]
        for _ in range(max_exits):
            reason = cpu.run()
            if reason == s.KVM_EXIT_IO and on_io is not None:
                is_write, port, size, _count, data = cpu.pio()
                on_io(is_write, port, size, data)
            elif reason == s.KVM_EXIT_MMIO and on_mmio is not None:
                on_mmio(*cpu.mmio())
            else:
                return reason
        raise RuntimeError(f"micro-guest did not stop within {max_exits} exits")

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.memory.close()
        self.vm.close()
        self.kvm.close()

    def __enter__(self) -> "MicroGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def time_loop_guest(iterations: int, kvm_path: str = "/dev/kvm") -> float:
    """Run loop_guest(iterations) to completion; return the KVM_RUN wall time in seconds.

    Raises AssertionError if the guest does not finish with its OUT then HLT.
    """
    with MicroGuest(loop_guest(iterations), kvm_path=kvm_path) as guest:
        start = time.perf_counter()
        reason = guest.run_until_exit()
        elapsed = time.perf_counter() - start
        assert reason == s.KVM_EXIT_IO, s.EXIT_REASON_NAMES.get(reason, reason)
        is_write, port, _size, _count, data = guest.vcpus[0].pio()
        assert is_write and port == LOOP_DONE_PORT and data[0] == LOOP_DONE_VALUE
        assert guest.run_until_exit() == s.KVM_EXIT_HLT
        assert guest.vcpus[0].get_regs().rcx & 0xFFFFFFFF == 0
        return elapsed


def kvm_usable(path: str = "/dev/kvm") -> bool:
    """True if ``path`` exists and this process may open it read-write."""
    import os
    return os.access(path, os.R_OK | os.W_OK)


KVM_SKIP_REASON = "/dev/kvm is missing or not accessible to this user"
