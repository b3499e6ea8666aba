"""A 16550A-compatible UART (the PC's 8250 family serial port).

Register map and behaviour follow the National Semiconductor PC16550D datasheet
(RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR; DLL/DLM when LCR.DLAB); the
probe it must pass is Linux's drivers/tty/serial/8250/8250_port.c autoconfig().
Transmission completes instantly; interrupts are ISA edges (as in Firecracker).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import BinaryIO, Callable

import msgspec

from ember.devices.irq import IrqLine

log = logging.getLogger(__name__)

COM1_BASE, COM1_IRQ = 0x3F8, 4
COM2_BASE, COM2_IRQ = 0x2F8, 3
COM3_BASE, COM3_IRQ = 0x3E8, 4
COM4_BASE, COM4_IRQ = 0x2E8, 3
PORT_COUNT = 8
"""Each UART decodes eight consecutive I/O ports."""

# Register offsets (datasheet table II).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

IER_ERBFI, IER_ETBEI, IER_ELSI, IER_EDSSI = 0x01, 0x02, 0x04, 0x08
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MODEM_STATUS, IIR_THR_EMPTY, IIR_RX_DATA, IIR_LINE_STATUS = 0x00, 0x02, 0x04, 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
FCR_KEPT_BITS = 0xC9
"""FIFO enable, DMA mode and the RX trigger level are remembered; the rest are strobes."""

LCR_DLAB = 0x80

MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MCR_MASK = 0x1F

LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_THRE, LSR_TEMT, LSR_FIFO_ERROR = 0x20, 0x40, 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTAS = 0x0F
MSR_LINES_UP = MSR_DCD | MSR_DSR | MSR_CTS
"""The host side is always connected and ready: carrier, data set ready, clear to send."""

FIFO_DEPTH = 16
"""The 16550A FIFO depth; bounds the loopback FIFO (Linux's size_fifo() counts it)."""

DEFAULT_DIVISOR = 12
"""9600 baud from the 1.8432 MHz clock; the guest reprograms it, we ignore the rate."""

Output = Callable[[bytes], None] | BinaryIO


class SerialState(msgspec.Struct):
    """Everything a UART holds, for snapshots: registers and undelivered input."""

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    fcr: int = 0
    scr: int = 0
    dll: int = DEFAULT_DIVISOR
    dlm: int = 0
    lsr_errors: int = 0
    msr: int = MSR_LINES_UP
    thr_interrupt: bool = False
    rx: bytes = b""
    loop_rx: bytes = b""


class Serial:
    """One UART: guest register access on the bus, host input from any thread.

    ``output`` receives every byte the guest transmits (a callable, or a binary
    file that is flushed after each write). ``enqueue_input`` never blocks and
    never drops: bytes wait in a host queue until the guest reads them.
    """

    def __init__(self, irq: IrqLine, output: Output) -> None:
        self._irq = irq
        self._emit = _output_function(output)
        self._lock = threading.Lock()
        self._s = SerialState()
        self._rx: collections.deque[int] = collections.deque()
        self._loop_rx: collections.deque[int] = collections.deque()
        self._irq_pending = False
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.output_errors = 0
        self.edges = 0

    # Bus side (vCPU threads).

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` consecutive byte registers starting at ``offset``."""
        return bytes(self._read_register(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        """Write each byte of ``data`` to consecutive registers from ``offset``."""
        for i, value in enumerate(data):
            self._write_register(offset + i, value)

    # Host side (the event loop).

    def enqueue_input(self, data: bytes) -> None:
        """Queue host bytes for the guest to receive; raises the RX interrupt."""
        if not data:
            return
        with self._lock:
            self._rx.extend(data)
            fire = self._update_irq(new_event=True)
        self._fire(fire)

    def input_backlog(self) -> int:
        """Bytes queued from the host that the guest has not read yet."""
        return len(self._rx)

    def metrics(self) -> dict[str, int]:
        """Counters: bytes transmitted by and delivered to the guest."""
        return {"tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes, "output_errors": self.output_errors}

    def describe(self) -> str:
        """Registers and interrupt state in one line, for a stuck VM's report."""
        with self._lock:
            s = self._s
            ident = self._interrupt_id()
            return (f"ier {s.ier:#x} lcr {s.lcr:#x} mcr {s.mcr:#x} fcr {s.fcr:#x}, "
                    f"pending {'none' if ident is None else hex(ident)}, thre {int(s.thr_interrupt)}, "
                    f"line {'high' if self._irq_pending else 'low'}, tx {self.tx_bytes} B, rx {self.rx_bytes} B, "
                    f"input waiting {len(self._rx)} B, edges sent {self.edges}")

    @property
    def state(self) -> SerialState:
        """A copy of the device state, including undelivered input."""
        with self._lock:
            return msgspec.structs.replace(self._s, rx=bytes(self._rx), loop_rx=bytes(self._loop_rx))

    def restore(self, state: SerialState) -> None:
        """Load a state saved by ``state``."""
        with self._lock:
            self._s = msgspec.structs.replace(state, rx=b"", loop_rx=b"")
            self._rx = collections.deque(state.rx)
            self._loop_rx = collections.deque(state.loop_rx[:FIFO_DEPTH])
            self._irq_pending = self._interrupt_id() is not None and not self._loopback()

    # Registers.

    def _read_register(self, offset: int) -> int:
        with self._lock:
            value = self._read_locked(offset)
            fire = self._update_irq(new_event=False)
        self._fire(fire)
        return value

    def _write_register(self, offset: int, value: int) -> None:
        with self._lock:
            transmitted, new_event = self._write_locked(offset, value)
            fire = self._update_irq(new_event)
        if transmitted is not None:
            self._transmit(transmitted)
        self._fire(fire)

    def _read_locked(self, offset: int) -> int:
        s = self._s
        dlab = s.lcr & LCR_DLAB
        if offset == RBR:
            return s.dll if dlab else self._receive_byte()
        if offset == IER:
            return s.dlm if dlab else s.ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return s.lcr
        if offset == MCR:
            return s.mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            value, s.msr = s.msr, s.msr & ~MSR_DELTAS
            return value
        if offset == SCR:
            return s.scr
        return 0xFF

    def _write_locked(self, offset: int, value: int) -> tuple[int | None, bool]:
        """Apply a write; returns (byte to transmit or None, is a new interrupt event)."""
        s = self._s
        value &= 0xFF
        dlab = s.lcr & LCR_DLAB
        if offset == THR and dlab:
            s.dll = value
        elif offset == THR:
            return self._transmit_locked(value)
        elif offset == IER and dlab:
            s.dlm = value
        elif offset == IER:
            self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            s.lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            s.scr = value
        # LSR and MSR are read-only (factory test writes are ignored).
        return None, False

    def _transmit_locked(self, value: int) -> tuple[int | None, bool]:
        s = self._s
        s.thr_interrupt = True  # the byte leaves at once: THR is empty again
        if self._loopback():
            if len(self._loop_rx) < FIFO_DEPTH:
                self._loop_rx.append(value)
            else:
                s.lsr_errors |= LSR_OE
            return None, False
        # THRE was already set or is set now: the output goes high if it was low (an edge then),
        # and stays high otherwise, as a 16550's INTR does; Linux's ISR reads IIR until it is clear.
        return value, False

    def _write_ier(self, value: int) -> None:
        s = self._s
        changed = (s.ier ^ value) & IER_ETBEI
        s.ier = value & IER_MASK
        if changed:
            # Enabling ETBEI while THR is empty asserts THRE (Linux's UART_BUG_THRE test).
            s.thr_interrupt = bool(s.ier & IER_ETBEI)

    def _write_fcr(self, value: int) -> None:
        s = self._s
        if (s.fcr ^ value) & FCR_ENABLE_FIFO or value & FCR_CLEAR_RX:
            # Host input is never discarded; only looped-back bytes live in the FIFO proper.
            self._loop_rx.clear()
        s.fcr = value & FCR_KEPT_BITS

    def _write_mcr(self, value: int) -> None:
        s = self._s
        s.mcr = value & MCR_MASK
        lines = _loopback_lines(s.mcr) if s.mcr & MCR_LOOP else MSR_LINES_UP
        old = s.msr
        deltas = ((old ^ lines) >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI
        s.msr = lines | (old & MSR_DELTAS) | deltas
        if not s.mcr & MCR_LOOP:
            self._loop_rx.clear()

    def _receive_byte(self) -> int:
        queue = self._loop_rx if self._loopback() else self._rx
        if not queue:
            return 0
        self.rx_bytes += 1
        return queue.popleft()

    def _read_iir(self) -> int:
        s = self._s
        ident = self._interrupt_id()
        if ident == IIR_THR_EMPTY:
            s.thr_interrupt = False  # reading IIR while it names THRE clears it
        fifo = IIR_FIFO_ENABLED if s.fcr & FCR_ENABLE_FIFO else 0
        return fifo | (IIR_NO_INT if ident is None else ident)

    def _read_lsr(self) -> int:
        s = self._s
        value = s.lsr_errors | LSR_THRE | LSR_TEMT
        if self._data_ready():
            value |= LSR_DR
        if s.lsr_errors and s.fcr & FCR_ENABLE_FIFO:
            value |= LSR_FIFO_ERROR
        s.lsr_errors = 0
        return value

    # Interrupts.

    def _interrupt_id(self) -> int | None:
        """The highest-priority pending interrupt (datasheet table IV), or None."""
        s = self._s
        if s.ier & IER_ELSI and s.lsr_errors:
            return IIR_LINE_STATUS
        if s.ier & IER_ERBFI and self._data_ready():
            return IIR_RX_DATA
        if s.ier & IER_ETBEI and s.thr_interrupt:
            return IIR_THR_EMPTY
        if s.ier & IER_EDSSI and s.msr & MSR_DELTAS:
            return IIR_MODEM_STATUS
        return None

    def _update_irq(self, new_event: bool) -> bool:
        """Track the interrupt output; True when an edge must be sent.

        In loopback mode the PC's IRQ gate (OUT2) is forced inactive, so no edge.
        """
        pending = self._interrupt_id() is not None and not self._loopback()
        fire = pending and (new_event or not self._irq_pending)
        self._irq_pending = pending
        return fire

    def _fire(self, fire: bool) -> None:
        if fire:
            self.edges += 1
            self._irq.trigger()

    # Helpers.

    def _loopback(self) -> bool:
        return bool(self._s.mcr & MCR_LOOP)

    def _data_ready(self) -> bool:
        return bool(self._loop_rx if self._loopback() else self._rx)

    def _transmit(self, value: int) -> None:
        self.tx_bytes += 1
        try:
            self._emit(bytes((value,)))
        except (OSError, ValueError):
            self.output_errors += 1
            if self.output_errors == 1:
                log.warning("serial output failed; dropping guest output", exc_info=True)


def _loopback_lines(mcr: int) -> int:
    """MSR input lines in loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD."""
    lines = 0
    for out_bit, in_bit in ((MCR_DTR, MSR_DSR), (MCR_RTS, MSR_CTS), (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD)):
        if mcr & out_bit:
            lines |= in_bit
    return lines


def _output_function(output: Output) -> Callable[[bytes], None]:
    """Adapt a callable or a binary file into one write-and-flush function."""
    write = getattr(output, "write", None)
    if write is None:
        return output  # type: ignore[return-value]
    flush = getattr(output, "flush", lambda: None)

    def emit(data: bytes) -> None:
        write(data)
        flush()

    return emit
