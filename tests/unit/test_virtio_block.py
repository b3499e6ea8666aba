"""virtio-blk (VIRTIO 1.2 5.2) end to end through the MMIO transport and a raw image."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.devices.virtio import block, mmio
from ember.devices.virtio.block import BlockDevice
from ember.devices.virtio.testdriver import BumpAllocator, MmioDriver
from ember.errors import ConfigError
from ember.memory import GuestMemory
from tests.fakes import RecordingIrq

RAM = 4 << 20
SECTORS = 64


OPEN_DISKS = []


@pytest.fixture()
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    while OPEN_DISKS:
        OPEN_DISKS.pop().transport.close()
    mem.close()


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


class Disk:
    """A started virtio-blk device plus a driver that speaks its request format."""

    def __init__(self, memory, path, **kwargs):
        self.memory = memory
        self.device = BlockDevice(str(path), **kwargs)
        self.irq = RecordingIrq()
        self.transport = mmio.VirtioMmioTransport(self.device, memory, self.irq)
        self.driver = MmioDriver(self.transport, memory, BumpAllocator(0x1000, RAM))
        (self.queue,) = self.driver.start()
        OPEN_DISKS.append(self)

    def request(self, rtype, sector=0, out=b"", in_len=0, *, indirect=False, split_header=False):
        """Submit one request; returns (status, data_in, used_len)."""
        header = struct.pack("<IIQ", rtype, 0, sector)
        d = self.driver
        bufs = [d.buffer(header[:8]), d.buffer(header[8:])] if split_header else [d.buffer(header)]
        if out:
            bufs.append(d.buffer(out))
        data_in = d.buffer(in_len, write=True) if in_len else None
        if data_in:
            bufs.append(data_in)
        status = d.buffer(1, write=True)
        self.memory.write(status.gpa, b"\xff")
        bufs.append(status)
        if indirect:
            head = self.queue.add_indirect(bufs, d.heap)
        else:
            head = self.queue.add_chain(bufs)
        d.kick(0)
        [(used_head, used_len)] = self.queue.take_used()
        assert used_head == head
        got = self.memory.read(data_in.gpa, in_len) if data_in else b""
        return self.memory.read(status.gpa, 1)[0], got, used_len


def config_u64(transport, offset):
    return int.from_bytes(transport.read(0x100 + offset, 4) + transport.read(0x100 + offset + 4, 4), "little")


def test_config_and_features(memory, image):
    disk = Disk(memory, image)
    assert config_u64(disk.transport, 0) == SECTORS
    assert int.from_bytes(disk.transport.read(0x100 + 20, 4), "little") == 512  # blk_size
    features = disk.driver.device_features()
    assert features & block.VIRTIO_BLK_F_FLUSH and not features & block.VIRTIO_BLK_F_RO
    assert features & block.VIRTIO_BLK_F_DISCARD and features & block.VIRTIO_BLK_F_WRITE_ZEROES


def test_read(memory, image):
    disk = Disk(memory, image)
    status, data, used = disk.request(block.VIRTIO_BLK_T_IN, sector=1, in_len=1024)
    assert status == block.VIRTIO_BLK_S_OK
    assert data == image.read_bytes()[512:1536]
    assert used == 1025
    assert disk.irq.count == 1


def test_write_then_read_back_indirect_and_split_header(memory, image):
    disk = Disk(memory, image)
    payload = os.urandom(2048)
    status, _, used = disk.request(block.VIRTIO_BLK_T_OUT, sector=10, out=payload, split_header=True)
    assert (status, used) == (block.VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[10 * 512:14 * 512] == payload
    status, data, _ = disk.request(block.VIRTIO_BLK_T_IN, sector=10, in_len=2048, indirect=True)
    assert (status, data) == (block.VIRTIO_BLK_S_OK, payload)


def test_flush_calls_fsync(memory, image, monkeypatch):
    disk = Disk(memory, image)
    synced = []
    monkeypatch.setattr(block.os, "fsync", lambda fd: synced.append(fd))
    status, _, _ = disk.request(block.VIRTIO_BLK_T_FLUSH)
    assert status == block.VIRTIO_BLK_S_OK and synced == [disk.device.fd]


def test_get_id(memory, image):
    disk = Disk(memory, image, drive_id="rootfs")
    status, data, used = disk.request(block.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == block.VIRTIO_BLK_S_OK
    assert data == b"rootfs".ljust(20, b"\0") and used == 21


# indirect=True: Linux's layout, served from the chain's span columns (iovec.py);
# indirect=False: the memoryview path. Both must answer alike.
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("sector,length", [(SECTORS, 512), (SECTORS - 1, 1024), (2**63, 512)])
def test_out_of_range_is_ioerr(memory, image, sector, length, indirect):
    disk = Disk(memory, image)
    status, _, used = disk.request(block.VIRTIO_BLK_T_IN, sector=sector, in_len=length, indirect=indirect)
    assert (status, used) == (block.VIRTIO_BLK_S_IOERR, 1)
    status, _, _ = disk.request(block.VIRTIO_BLK_T_OUT, sector=sector, out=bytes(length), indirect=indirect)
    assert status == block.VIRTIO_BLK_S_IOERR


@pytest.mark.parametrize("indirect", [False, True])
def test_unaligned_length_is_ioerr(memory, image, indirect):
    disk = Disk(memory, image)
    status, _, _ = disk.request(block.VIRTIO_BLK_T_IN, sector=0, in_len=100, indirect=indirect)
    assert status == block.VIRTIO_BLK_S_IOERR


def test_unsupported_type(memory, image):
    disk = Disk(memory, image)
    status, _, used = disk.request(99)
    assert (status, used) == (block.VIRTIO_BLK_S_UNSUPP, 1)


@pytest.mark.parametrize("indirect", [False, True])
def test_read_only_drive(memory, image, indirect):
    before = image.read_bytes()
    disk = Disk(memory, image, read_only=True)
    assert disk.driver.device_features() & block.VIRTIO_BLK_F_RO
    status, _, _ = disk.request(block.VIRTIO_BLK_T_OUT, sector=0, out=bytes(512), indirect=indirect)
    assert status == block.VIRTIO_BLK_S_IOERR
    status, data, _ = disk.request(block.VIRTIO_BLK_T_IN, sector=0, in_len=512, indirect=indirect)
    assert status == block.VIRTIO_BLK_S_OK and data == before[:512]
    assert image.read_bytes() == before


@pytest.mark.parametrize("rtype,flags", [(block.VIRTIO_BLK_T_DISCARD, 0),
                                         (block.VIRTIO_BLK_T_WRITE_ZEROES, 0),
                                         (block.VIRTIO_BLK_T_WRITE_ZEROES, 1)])
def test_discard_and_write_zeroes(memory, image, rtype, flags):
    disk = Disk(memory, image)
    before = image.read_bytes()
    segment = struct.pack("<QII", 8, 16, flags)
    status, _, _ = disk.request(rtype, out=segment)
    assert status == block.VIRTIO_BLK_S_OK
    after = image.read_bytes()
    assert len(after) == len(before)
    assert after[:8 * 512] == before[:8 * 512] and after[24 * 512:] == before[24 * 512:]
    if rtype == block.VIRTIO_BLK_T_WRITE_ZEROES or after[8 * 512:24 * 512] != before[8 * 512:24 * 512]:
        assert after[8 * 512:24 * 512] == bytes(16 * 512)


def test_discard_with_unmap_flag_is_unsupported(memory, image):
    disk = Disk(memory, image)
    status, _, _ = disk.request(block.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 1, 1))
    assert status == block.VIRTIO_BLK_S_UNSUPP


def test_write_zeroes_fallback_writes_zero_bytes(memory, image, monkeypatch):
    def no_fallocate(fd, mode, offset, length):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(block, "fallocate", no_fallocate)
    disk = Disk(memory, image)
    status, _, _ = disk.request(block.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 2, 3, 0))
    assert status == block.VIRTIO_BLK_S_OK
    assert image.read_bytes()[1024:2560] == bytes(1536)


def test_request_without_status_byte_needs_reset(memory, image):
    disk = Disk(memory, image)
    d = disk.driver
    disk.queue.add_chain([d.buffer(struct.pack("<IIQ", block.VIRTIO_BLK_T_IN, 0, 0))])
    d.kick(0)
    assert disk.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_short_header_needs_reset(memory, image):
    disk = Disk(memory, image)
    d = disk.driver
    disk.queue.add_chain([d.buffer(b"\0" * 8), d.buffer(1, write=True)])
    d.kick(0)
    assert disk.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET


def test_missing_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        BlockDevice(str(tmp_path / "nope.img"))


def test_metrics_count_requests_bytes_and_failures(memory, image):
    disk = Disk(memory, image)
    disk.request(block.VIRTIO_BLK_T_IN, sector=0, in_len=1024)
    disk.request(block.VIRTIO_BLK_T_IN, sector=2, in_len=512, indirect=True)
    disk.request(block.VIRTIO_BLK_T_OUT, sector=0, out=bytes(1536))
    disk.request(block.VIRTIO_BLK_T_FLUSH)
    disk.request(block.VIRTIO_BLK_T_IN, sector=SECTORS, in_len=512)  # past the end
    pages = scattered_request(disk, block.VIRTIO_BLK_T_IN, 4, 3, indirect=True)  # the span path
    assert pages[0] == block.VIRTIO_BLK_S_OK
    assert disk.device.metrics() == {
        "read_count": 3, "read_bytes": 1024 + 512 + 3 * 512, "write_count": 1, "write_bytes": 1536,
        "flush_count": 1, "execute_fails": 1, "update_count": 0, "update_fails": 0,
        "rate_limiter_throttled_events": 0}


def test_media_change_serves_the_new_image_and_tells_the_driver(memory, image, tmp_path):
    disk = Disk(memory, image)
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(512 * SECTORS * 2))
    generation = disk.driver.read32(mmio.REG_CONFIG_GENERATION)
    old_fd = disk.device.fd
    disk.transport.change_device(lambda: disk.device.change_media(str(other)))
    assert disk.driver.read32(mmio.REG_INTERRUPT_STATUS) == mmio.INT_CONFIG_CHANGE and disk.irq.count == 1
    assert disk.driver.read32(mmio.REG_CONFIG_GENERATION) != generation
    assert config_u64(disk.transport, 0) == SECTORS * 2
    with pytest.raises(OSError):
        os.fstat(old_fd)  # the old image is closed
    status, data, _ = disk.request(block.VIRTIO_BLK_T_IN, sector=SECTORS + 1, in_len=1024)
    assert status == block.VIRTIO_BLK_S_OK and data == other.read_bytes()[(SECTORS + 1) * 512:][:1024]
    payload = os.urandom(512)
    assert disk.request(block.VIRTIO_BLK_T_OUT, sector=3, out=payload)[0] == block.VIRTIO_BLK_S_OK
    assert other.read_bytes()[3 * 512:4 * 512] == payload
    assert image.read_bytes() == bytes(range(256)) * (SECTORS * 2)


def test_failed_media_change_changes_nothing(memory, image, tmp_path):
    disk = Disk(memory, image)
    generation = disk.driver.read32(mmio.REG_CONFIG_GENERATION)
    with pytest.raises(ConfigError):
        disk.transport.change_device(lambda: disk.device.change_media(str(tmp_path / "missing.img")))
    assert disk.driver.read32(mmio.REG_CONFIG_GENERATION) == generation and disk.irq.count == 0
    assert disk.device.path == str(image) and config_u64(disk.transport, 0) == SECTORS
    assert disk.device.metrics()["update_fails"] == 1 and disk.device.metrics()["update_count"] == 0
    status, data, _ = disk.request(block.VIRTIO_BLK_T_IN, sector=0, in_len=512)
    assert status == block.VIRTIO_BLK_S_OK and data == image.read_bytes()[:512]


def test_read_only_drive_stays_read_only_across_a_media_change(memory, image, tmp_path):
    disk = Disk(memory, image, read_only=True)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(512 * SECTORS))
    os.chmod(other, 0o444)
    disk.transport.change_device(lambda: disk.device.change_media(str(other)))
    assert disk.request(block.VIRTIO_BLK_T_OUT, sector=0, out=b"x" * 512)[0] == block.VIRTIO_BLK_S_IOERR
    assert other.read_bytes() == bytes(512 * SECTORS)


def scattered_request(disk, rtype, sector, pages, out=b"", *, indirect):
    """A Linux-style request whose data is ``pages`` separate 512-byte buffers, each
    followed by a gap so that none merges with the next; returns (status, data, used)."""
    d = disk.driver
    header = d.buffer(struct.pack("<IIQ", rtype, 0, sector))
    data = []
    for index in range(pages):
        data.append(d.buffer(out[index * 512:(index + 1) * 512] if out else 512, write=not out))
        if not out:
            disk.memory.write(data[-1].gpa, bytes(512))  # what a refused read must leave untouched
        d.heap.alloc(512)  # the gap
    status = d.buffer(1, write=True)
    bufs = [header, *data, status]
    head = disk.queue.add_indirect(bufs, d.heap) if indirect else disk.queue.add_chain(bufs)
    d.kick(0)
    [(used_head, used)] = disk.queue.take_used()
    assert used_head == head
    got = b"".join(disk.memory.read(b.gpa, b.length) for b in data) if not out else b""
    return disk.memory.read(status.gpa, 1)[0], got, used


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sector=st.integers(0, SECTORS + 4), pages=st.integers(1, 12), seed=st.binary(min_size=1, max_size=8),
       read_only=st.booleans())
def test_span_path_and_view_path_agree(memory, image, sector, pages, seed, read_only):
    """Scattered reads and writes: the iovec path (indirect) and the memoryview path
    (direct chain) leave the same bytes in the image and the guest, with the same status."""
    disk = Disk(memory, image, read_only=read_only)
    payload = (seed * (pages * 512 // len(seed) + 1))[:pages * 512]
    outcomes = []
    for indirect in (True, False):
        before = image.read_bytes()
        wrote = scattered_request(disk, block.VIRTIO_BLK_T_OUT, sector, pages, payload, indirect=indirect)
        written_image = image.read_bytes()
        image.write_bytes(before)
        read = scattered_request(disk, block.VIRTIO_BLK_T_IN, sector, pages, indirect=indirect)
        outcomes.append((wrote, written_image, read))
    assert outcomes[0] == outcomes[1]
    (w_status, _, w_used), written_image, (r_status, data, r_used) = outcomes[0]
    fits = sector + pages <= SECTORS
    assert w_status == (block.VIRTIO_BLK_S_OK if fits and not read_only else block.VIRTIO_BLK_S_IOERR)
    assert r_status == (block.VIRTIO_BLK_S_OK if fits else block.VIRTIO_BLK_S_IOERR)
    if fits:
        assert data == image.read_bytes()[sector * 512:(sector + pages) * 512] and r_used == pages * 512 + 1
    if w_status == block.VIRTIO_BLK_S_OK:
        assert written_image[sector * 512:(sector + pages) * 512] == payload
    disk.transport.close()


def test_a_short_vectored_read_is_finished_by_the_general_path(memory, image, monkeypatch):
    from ember.devices.virtio import iovec

    disk = Disk(memory, image)
    real, calls = iovec.preadv, []

    def half(fd, iov, offset, first, count):  # as if the file gave only part of the request
        calls.append(count)
        return real(fd, iov, offset, first, count // 2)

    monkeypatch.setattr(iovec, "preadv", half)
    monkeypatch.setattr(block.iovec, "preadv", half)
    status, data, used = scattered_request(disk, block.VIRTIO_BLK_T_IN, 2, 6, indirect=True)
    assert calls == [6]  # the span path ran, and stopped short after three pages
    assert (status, used) == (block.VIRTIO_BLK_S_OK, 6 * 512 + 1)
    assert data == image.read_bytes()[2 * 512:8 * 512]


def test_batch_of_requests_one_kick(memory, image):
    disk = Disk(memory, image, queue_size=16)
    d = disk.driver
    heads = []
    for sector in range(5):  # 15 descriptors fit a 16-entry queue
        header = d.buffer(struct.pack("<IIQ", block.VIRTIO_BLK_T_IN, 0, sector))
        heads.append(disk.queue.add_chain([header, d.buffer(512, write=True), d.buffer(1, write=True)]))
    d.kick(0)
    assert [h for h, _ in disk.queue.take_used()] == heads
    assert disk.irq.count == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=st.one_of(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 2**32 - 1)),
       sector=st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1)),
       out=st.binary(max_size=1100), in_len=st.integers(0, 1100), read_only=st.booleans())
def test_fuzz_requests_always_get_a_status(memory, image, rtype, sector, out, in_len, read_only):
    size = image.stat().st_size
    disk = Disk(memory, image, read_only=read_only)
    status, _, used = disk.request(rtype, sector, out, in_len)
    assert status in (block.VIRTIO_BLK_S_OK, block.VIRTIO_BLK_S_IOERR, block.VIRTIO_BLK_S_UNSUPP)
    assert 1 <= used <= in_len + 1
    assert not disk.transport.status & mmio.STATUS_DEVICE_NEEDS_RESET
    assert image.stat().st_size == size
    disk.transport.close()
