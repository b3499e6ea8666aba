"""Unit tests for the 16550A UART (ember.devices.legacy.serial)."""

from __future__ import annotations

import io
import threading

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.devices.bus import Bus
from ember.devices.legacy import serial as uart
from ember.devices.legacy.serial import Serial, SerialState

BASE = uart.COM1_BASE


class RecordingIrqLine:
    """Test double for IrqLine: counts edges and remembers the level."""

    def __init__(self) -> None:
        self.edges = 0
        self.level = False

    def trigger(self) -> None:
        self.edges += 1

    def set_level(self, high: bool) -> None:
        self.level = high


class Port:
    """A UART on a PIO bus, accessed the way a guest does (inb/outb)."""

    def __init__(self) -> None:
        self.irq = RecordingIrqLine()
        self.out = bytearray()
        self.dev = Serial(self.irq, self.out.extend)
        self.bus = Bus("pio")
        self.bus.register(BASE, uart.PORT_COUNT, self.dev, "com1")

    def inb(self, reg: int) -> int:
        return self.bus.read(BASE + reg, 1)[0]

    def outb(self, reg: int, value: int) -> None:
        assert self.bus.write(BASE + reg, bytes((value,)))


def test_transmit_goes_to_the_output_callable() -> None:
    p = Port()
    for ch in b"hello\n":
        p.outb(uart.THR, ch)
    assert bytes(p.out) == b"hello\n"
    assert p.dev.metrics()["tx_bytes"] == 6
    assert p.inb(uart.LSR) & (uart.LSR_THRE | uart.LSR_TEMT) == uart.LSR_THRE | uart.LSR_TEMT


def test_transmit_to_a_binary_file_is_flushed() -> None:
    class File(io.BytesIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    f = File()
    dev = Serial(RecordingIrqLine(), f)
    dev.write(uart.THR, b"A")
    assert f.getvalue() == b"A" and f.flushes == 1


def test_output_errors_are_counted_not_raised() -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError

    dev = Serial(RecordingIrqLine(), broken)
    dev.write(uart.THR, b"x")
    assert dev.metrics()["output_errors"] == 1


def test_receive_sets_data_ready_and_preserves_order() -> None:
    p = Port()
    assert not p.inb(uart.LSR) & uart.LSR_DR
    data = bytes(range(256)) * 2  # more than any FIFO holds
    p.dev.enqueue_input(data)
    got = bytearray()
    while p.inb(uart.LSR) & uart.LSR_DR:
        got.append(p.inb(uart.RBR))
    assert bytes(got) == data
    assert p.dev.input_backlog() == 0
    assert p.dev.metrics()["rx_bytes"] == len(data)
    assert p.inb(uart.RBR) == 0  # reading an empty receiver is harmless


def test_receive_interrupt_only_when_enabled() -> None:
    p = Port()
    p.dev.enqueue_input(b"a")
    assert p.irq.edges == 0
    assert p.inb(uart.IIR) & uart.IIR_NO_INT
    p.outb(uart.IER, uart.IER_ERBFI)  # enabling with data waiting raises it
    assert p.irq.edges == 1
    assert p.inb(uart.IIR) & 0x0F == uart.IIR_RX_DATA
    p.dev.enqueue_input(b"b")  # every new RX event is a fresh edge
    assert p.irq.edges == 2
    p.inb(uart.RBR)
    p.inb(uart.RBR)
    assert p.inb(uart.IIR) & uart.IIR_NO_INT


def test_thr_empty_interrupt_and_iir_read_clears_it() -> None:
    p = Port()
    p.outb(uart.IER, uart.IER_ETBEI)
    assert p.irq.edges == 1  # THR is empty: enabling ETBEI asserts THRE
    assert p.inb(uart.IIR) & 0x0F == uart.IIR_THR_EMPTY
    assert p.inb(uart.IIR) & uart.IIR_NO_INT  # the IIR read cleared it
    p.outb(uart.THR, ord("x"))
    assert p.irq.edges == 2  # transmitter empty again: a new edge
    assert p.inb(uart.IIR) & 0x0F == uart.IIR_THR_EMPTY


def test_a_burst_of_thr_writes_raises_one_edge_while_the_output_stays_high() -> None:
    p = Port()
    p.outb(uart.IER, uart.IER_ETBEI)
    assert p.inb(uart.IIR) & 0x0F == uart.IIR_THR_EMPTY and p.irq.edges == 1
    for byte in b"0123456789abcdef":  # one FIFO's worth, as Linux's tx_chars writes it
        p.outb(uart.THR, byte)
    assert p.irq.edges == 2  # the output went high once; INTR stays high, no edge per byte
    assert p.inb(uart.IIR) & 0x0F == uart.IIR_THR_EMPTY
    assert p.inb(uart.IIR) & uart.IIR_NO_INT
    p.outb(uart.THR, ord("g"))  # low again, so the next byte is a new edge
    assert p.irq.edges == 3
    assert "pending 0x2, thre 1, line high, tx 17 B" in p.dev.describe() and "edges sent 3" in p.dev.describe()


def test_interrupt_priority_line_status_rx_thre_modem() -> None:
    p = Port()
    # A loopback overrun makes a line-status condition; modem deltas come from MCR.
    p.outb(uart.MCR, uart.MCR_LOOP)
    for i in range(uart.FIFO_DEPTH + 1):
        p.outb(uart.THR, i)
    p.outb(uart.MCR, uart.MCR_LOOP | uart.MCR_RTS)  # CTS changes: DCTS
    p.outb(uart.IER, uart.IER_MASK)
    ids = []
    ids.append(p.inb(uart.IIR) & 0x0F)
    p.inb(uart.LSR)  # clears the overrun
    ids.append(p.inb(uart.IIR) & 0x0F)
    while p.inb(uart.LSR) & uart.LSR_DR:
        p.inb(uart.RBR)
    ids.append(p.inb(uart.IIR) & 0x0F)  # THRE, cleared by this read
    ids.append(p.inb(uart.IIR) & 0x0F)
    p.inb(uart.MSR)
    ids.append(p.inb(uart.IIR) & 0x0F)
    assert ids == [
        uart.IIR_LINE_STATUS,
        uart.IIR_RX_DATA,
        uart.IIR_THR_EMPTY,
        uart.IIR_MODEM_STATUS,
        uart.IIR_NO_INT,
    ]
    assert p.irq.edges == 0  # loopback gates the IRQ output off


def test_loopback_echoes_and_sets_modem_lines() -> None:
    p = Port()
    p.outb(uart.MCR, uart.MCR_LOOP | uart.MCR_DTR | uart.MCR_OUT1)
    assert p.inb(uart.MSR) & 0xF0 == uart.MSR_DSR | uart.MSR_RI
    p.outb(uart.THR, 0x5A)
    assert p.out == b""  # nothing leaves the chip
    assert p.inb(uart.LSR) & uart.LSR_DR
    assert p.inb(uart.RBR) == 0x5A
    p.outb(uart.MCR, uart.MCR_LOOP)
    assert p.inb(uart.MSR) & uart.MSR_TERI  # RI went away
    p.outb(uart.MCR, 0)
    assert p.inb(uart.MSR) & 0xF0 == uart.MSR_LINES_UP


def test_divisor_latch_is_behind_dlab() -> None:
    p = Port()
    p.outb(uart.IER, 0x05)
    p.outb(uart.LCR, uart.LCR_DLAB | 0x03)
    p.outb(uart.DLL, 0x01)
    p.outb(uart.DLM, 0x02)
    assert (p.inb(uart.DLL), p.inb(uart.DLM)) == (0x01, 0x02)
    p.outb(uart.LCR, 0x03)
    assert p.inb(uart.IER) == 0x05
    assert p.inb(uart.LCR) == 0x03
    assert p.out == b""  # the DLL write did not transmit
    assert p.dev.state.dll == 0x01 and p.dev.state.dlm == 0x02


def test_scratch_register_and_fifo_bits() -> None:
    p = Port()
    p.outb(uart.SCR, 0xA5)
    assert p.inb(uart.SCR) == 0xA5
    assert p.inb(uart.IIR) == uart.IIR_NO_INT  # FIFOs off after reset
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO)
    assert p.inb(uart.IIR) == uart.IIR_FIFO_ENABLED | uart.IIR_NO_INT


def test_fifo_clear_keeps_host_input() -> None:
    p = Port()
    p.dev.enqueue_input(b"typed early")
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO | uart.FCR_CLEAR_RX | uart.FCR_CLEAR_TX)
    assert p.dev.input_backlog() == len(b"typed early")


def test_input_from_another_thread_loses_nothing() -> None:
    p = Port()
    p.outb(uart.IER, uart.IER_ERBFI)
    chunks = [bytes([i % 251]) * (i % 7 + 1) for i in range(2000)]
    expected = b"".join(chunks)

    def producer() -> None:
        for chunk in chunks:
            p.dev.enqueue_input(chunk)

    thread = threading.Thread(target=producer)
    thread.start()
    got = bytearray()
    while len(got) < len(expected):
        if p.inb(uart.LSR) & uart.LSR_DR:
            got.append(p.inb(uart.RBR))
        elif not thread.is_alive() and not p.inb(uart.LSR) & uart.LSR_DR:
            break
    thread.join()
    assert bytes(got) == expected


def test_state_round_trips_through_msgpack() -> None:
    p = Port()
    p.outb(uart.LCR, 0x03)
    p.outb(uart.IER, uart.IER_ERBFI)
    p.outb(uart.SCR, 0x42)
    p.dev.enqueue_input(b"pending")
    blob = msgspec.msgpack.encode(p.dev.state)
    restored = Serial(RecordingIrqLine(), bytearray().extend)
    restored.restore(msgspec.msgpack.decode(blob, type=SerialState))
    assert restored.state == p.dev.state
    assert restored.read(uart.LSR, 1)[0] & uart.LSR_DR
    assert b"".join(restored.read(uart.RBR, 1) for _ in range(7)) == b"pending"


def test_linux_autoconfig_detects_a_16550a() -> None:
    """Replays drivers/tty/serial/8250/8250_port.c autoconfig() (Linux 6.1)."""
    p = Port()
    # Existence test: IER holds exactly the low nibble.
    scratch = p.inb(uart.IER)
    p.outb(uart.IER, 0)
    scratch2 = p.inb(uart.IER) & 0x0F
    p.outb(uart.IER, 0x0F)
    scratch3 = p.inb(uart.IER) & 0x0F
    p.outb(uart.IER, scratch)
    assert (scratch2, scratch3) == (0, 0x0F)
    save_mcr, save_lcr = p.inb(uart.MCR), p.inb(uart.LCR)
    # Loopback test: RTS|OUT2 in loop mode read back as CTS|DCD.
    p.outb(uart.MCR, uart.MCR_LOOP | 0x0A)
    status1 = p.inb(uart.MSR) & 0xF0
    p.outb(uart.MCR, save_mcr)
    assert status1 == 0x90
    # FIFO type: EFR write under LCR 0xBF, then FCR enable, then IIR bits 6-7.
    p.outb(uart.LCR, 0xBF)
    p.outb(2, 0)
    p.outb(uart.LCR, 0)
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO)
    assert p.inb(uart.IIR) >> 6 == 3
    _autoconfig_16550a_variants(p)
    p.outb(uart.LCR, save_lcr)
    # Tail: restore MCR, clear FIFOs, read RX, clear IER.
    p.outb(uart.MCR, save_mcr)
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO)
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO | uart.FCR_CLEAR_RX | uart.FCR_CLEAR_TX)
    p.outb(uart.FCR, 0)
    p.inb(uart.RBR)
    p.outb(uart.IER, 0)
    _startup_thre_test(p)


def _autoconfig_16550a_variants(p: Port) -> None:
    """With CONFIG_SERIAL_8250_16550A_VARIANTS: each test must say 'plain 16550A'."""
    p.outb(uart.LCR, 0x80)  # UART_LCR_CONF_MODE_A: EFR must not read 0
    assert p.inb(2) != 0
    p.outb(uart.LCR, 0xBF)  # UART_LCR_CONF_MODE_B
    assert p.inb(2) != 0
    # National Semiconductor check: EXCR1 (reg 2 under LCR 0xE0) must not track MCR.LOOP.
    p.outb(uart.LCR, 0)
    mcr = p.inb(uart.MCR)
    p.outb(uart.LCR, 0xE0)
    excr1 = p.inb(2)
    if not (excr1 ^ mcr) & uart.MCR_LOOP:
        p.outb(uart.LCR, 0)
        p.outb(uart.MCR, mcr ^ uart.MCR_LOOP)
        p.outb(uart.LCR, 0xE0)
        excr1 = p.inb(2)
        p.outb(uart.LCR, 0)
        p.outb(uart.MCR, mcr)
        assert not (excr1 ^ mcr) & uart.MCR_LOOP
    # TI16750: IIR bit 5 must not follow FCR bit 5.
    p.outb(uart.LCR, 0)
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO | 0x20)
    s1 = p.inb(uart.IIR) >> 5
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO)
    p.outb(uart.LCR, 0x80)
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO | 0x20)
    s2 = p.inb(uart.IIR) >> 5
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO)
    p.outb(uart.LCR, 0)
    assert not (s1 == 6 and s2 == 7)
    # XScale: IER bit 6 (UUE) must not stick.
    ier = p.inb(uart.IER)
    p.outb(uart.IER, ier | 0x40)
    assert not p.inb(uart.IER) & 0x40
    p.outb(uart.IER, ier)
    assert _size_fifo(p) == uart.FIFO_DEPTH


def _size_fifo(p: Port) -> int:
    old_lcr = p.inb(uart.LCR)
    p.outb(uart.LCR, 0)
    old_fcr = p.inb(uart.FCR)
    old_mcr = p.inb(uart.MCR)
    p.outb(uart.FCR, uart.FCR_ENABLE_FIFO | uart.FCR_CLEAR_RX | uart.FCR_CLEAR_TX)
    p.outb(uart.MCR, uart.MCR_LOOP)
    p.outb(uart.LCR, 0x80)
    old_dl = p.inb(uart.DLL) | p.inb(uart.DLM) << 8
    p.outb(uart.DLL, 1)
    p.outb(uart.DLM, 0)
    p.outb(uart.LCR, 0x03)
    for count in range(256):
        p.outb(uart.THR, count)
    count = 0
    while p.inb(uart.LSR) & uart.LSR_DR and count < 256:
        p.inb(uart.RBR)
        count += 1
    p.outb(uart.FCR, old_fcr)
    p.outb(uart.MCR, old_mcr)
    p.outb(uart.LCR, 0x80)
    p.outb(uart.DLL, old_dl & 0xFF)
    p.outb(uart.DLM, old_dl >> 8)
    p.outb(uart.LCR, old_lcr)
    assert p.out == b""  # nothing leaked to the console during the probe
    return count


def _startup_thre_test(p: Port) -> None:
    """serial8250_do_startup(): THRE must re-assert after IER is rewritten."""
    p.outb(uart.IER, uart.IER_ETBEI)
    iir1 = p.inb(uart.IIR)
    p.outb(uart.IER, 0)
    p.outb(uart.IER, uart.IER_ETBEI)
    iir = p.inb(uart.IIR)
    p.outb(uart.IER, 0)
    assert not iir1 & uart.IIR_NO_INT and not iir & uart.IIR_NO_INT  # no UART_BUG_THRE


register_access = st.tuples(
    st.booleans(),
    st.integers(0, uart.PORT_COUNT - 1),
    st.integers(-(1 << 16), 1 << 16),
    st.integers(1, 4),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(register_access, max_size=200), st.binary(max_size=64))
def test_hostile_register_accesses_never_raise(accesses: list, host_input: bytes) -> None:
    p = Port()
    p.dev.enqueue_input(host_input)
    for is_write, reg, value, size in accesses:
        if is_write:
            p.dev.write(reg, value.to_bytes(4, "little", signed=True)[:size])
        else:
            data = p.dev.read(reg, size)
            assert len(data) == size and all(0 <= b <= 0xFF for b in data)
    iir = p.dev.read(uart.IIR, 1)[0]
    assert iir & 0x30 == 0  # bits 4-5 of IIR always read zero
    state = p.dev.state
    assert state.ier <= uart.IER_MASK and state.mcr <= uart.MCR_MASK
