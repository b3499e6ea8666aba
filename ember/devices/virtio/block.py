"""virtio-blk backed by a raw image file or block device (VIRTIO 1.2 section 5.2).

One request queue; requests are a 16-byte header, data buffers and a status
byte (5.2.6). Data moves with preadv/pwritev straight between the image and
guest memory: reads and writes in Linux's layout (header, data and status each
in their own descriptors) from an iovec array built off the chain's address
columns (iovec.py), anything else through memoryviews. FLUSH fsyncs before
the request completes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
from collections.abc import Callable

from ember.devices.virtio import iovec
from ember.devices.virtio.buffers import gather, scatter, split_views
from ember.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice
from ember.devices.virtio.queue import DescriptorChain, GuestSpans, VirtqueueError
from ember.errors import ConfigError

log = logging.getLogger(__name__)

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types and status values (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
VIRTIO_BLK_ID_BYTES = 20
REQUEST_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
RANGE_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
STATUS_SIZE = 1

# 512 entries let seg_max (queue size - 2, since a chain may not outgrow the queue)
# cover a whole 1 MiB request of scattered 4 KiB pages plus header and status:
# with 256, Linux splits every 1 MiB I/O into a 254-page and a 2-page request.
DEFAULT_QUEUE_SIZE = 512
SIZE_MAX = 1 << 20  # largest single data segment we advertise
MAX_RANGE_SEGMENTS = 32
MAX_RANGE_SECTORS = 0x3FFFFF  # 2 GiB - 512 per discard / write-zeroes segment
DISCARD_ALIGNMENT_SECTORS = 8  # 4 KiB, a typical file-system block
ZERO_CHUNK = 1 << 20

# Config layout (5.2.4), up to write_zeroes_may_unmap.
CONFIG = struct.Struct("<QII4xI8xBxH III IIB3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class RequestError(Exception):
    """A request the device answers with an error status instead of data."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) through ctypes: Python's os module only has posix_fallocate."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class BlockDevice(VirtioDevice):
    """A virtio-blk disk on a raw image."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, path: str, *, read_only: bool = False, drive_id: str = "",
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.path = path
        self.read_only = read_only
        self.drive_id = drive_id.encode()[:VIRTIO_BLK_ID_BYTES]
        self.fd = self._open(path, read_only)
        self.capacity = self._size() >> SECTOR_SHIFT
        self.queue_size = queue_size
        self.read_count = self.read_bytes = self.write_count = self.write_bytes = self.flush_count = 0
        self.execute_fails = self.update_count = self.update_fails = 0
        super().__init__([queue_size], self._features())

    @staticmethod
    def _open(path: str, read_only: bool) -> int:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ConfigError(f"cannot open drive image {path}: {exc.strerror}") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fd)
            raise ConfigError(f"drive image {path} is not a regular file or block device")
        return fd

    def _size(self) -> int:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size % SECTOR_SIZE:
            log.warning("drive %s: size %d not a multiple of %d; the tail is hidden",
                        self.path, size, SECTOR_SIZE)
        return size

    def _features(self) -> int:
        features = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                    | VIRTIO_BLK_F_FLUSH)
        if self.read_only:
            return features | VIRTIO_BLK_F_RO
        return features | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def config_bytes(self) -> bytes:
        return CONFIG.pack(
            self.capacity, SIZE_MAX, self.queue_size - 2, SECTOR_SIZE,
            0, 0,  # writeback (needs CONFIG_WCE), num_queues (needs MQ)
            MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, DISCARD_ALIGNMENT_SECTORS,
            MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, 1)  # write_zeroes_may_unmap

    def change_media(self, path: str) -> None:
        """Serve the image at ``path`` from now on (Firecracker's PATCH /drives): same
        read-only mode and ID, the new file's size. If it cannot be opened, nothing changes.
        The caller holds the transport between requests and then signals a config change."""
        try:
            fd = self._open(path, self.read_only)
        except ConfigError:
            self.update_fails += 1
            raise
        self.update_count += 1
        old, self.fd, self.path = self.fd, fd, path
        self.capacity = self._size() >> SECTOR_SHIFT
        if old >= 0:
            os.close(old)
        log.info("drive %s: now %s, %d sectors", self.drive_id.decode(errors="replace"), path, self.capacity)

    def metrics(self) -> dict[str, int]:
        return {"read_count": self.read_count, "read_bytes": self.read_bytes, "write_count": self.write_count,
                "write_bytes": self.write_bytes, "flush_count": self.flush_count,
                "execute_fails": self.execute_fails, "update_count": self.update_count,
                "update_fails": self.update_fails,
                "rate_limiter_throttled_events": self.throttled_events.get(0, 0)}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- request processing -----------------------------------------------------
    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        pushed = False
        while (chain := queue.pop()) is not None:
            if self.limiters and self.throttle(index, self._payload(chain)):
                queue.undo_pop(1)  # served when the limiter allows (device.py)
                break
            queue.push_used(chain.head, self._serve(chain))
            pushed = True
        if pushed:
            self.signal_used(index)

    @staticmethod
    def _payload(chain: DescriptorChain) -> int:
        """The bytes a request moves, for the bandwidth limit: all but header and status."""
        return max(0, chain.readable_len + chain.writable_len - REQUEST_HEADER.size - STATUS_SIZE)

    def _serve(self, chain: DescriptorChain) -> int:
        """Run one request; returns the bytes written into the guest's buffers."""
        if chain.spans is not None:
            served = self._serve_spans(chain.spans)
            if served is not None:
                return served
        header, data_out = split_views(chain.readable, REQUEST_HEADER.size)
        if sum(map(len, header)) < REQUEST_HEADER.size:
            raise VirtqueueError("virtio-blk request header shorter than 16 bytes")
        if not chain.writable:
            raise VirtqueueError("virtio-blk request without a status byte")
        rtype, _, sector = REQUEST_HEADER.unpack(gather(header))
        data_in, status_view = self._split_status(chain.writable)
        written, status_view[0] = self._attempt(rtype, sector, lambda: self._dispatch(rtype, sector, data_out, data_in))
        return written + STATUS_SIZE

    def _serve_spans(self, spans: GuestSpans) -> int | None:
        """A read or write laid out as Linux does it, straight from the chain's iovec array;
        None for anything else (the memoryview path serves it). Every span is inside guest RAM."""
        iov, count = spans.iov, spans.count
        if not 3 <= count <= iovec.IOV_MAX + 2 or iov[1] != REQUEST_HEADER.size or iov[-1] != STATUS_SIZE:
            return None
        ram = spans.region.view
        rtype, _, sector = REQUEST_HEADER.unpack_from(ram, spans.offset(0))
        if rtype == VIRTIO_BLK_T_IN and spans.readable == 1:
            reading = True
        elif rtype == VIRTIO_BLK_T_OUT and spans.readable == count - 1 and not self.read_only:
            reading = False
        else:
            return None
        length = spans.inner_length()
        try:
            self._span_io(sector, length, reading, spans)
            status = VIRTIO_BLK_S_OK
        except RequestError as exc:
            status = self._failed(rtype, sector, exc)
        ram[spans.offset(count - 1)] = status
        return (length if reading and status == VIRTIO_BLK_S_OK else 0) + STATUS_SIZE

    def _attempt(self, rtype: int, sector: int, work: Callable[[], int]) -> tuple[int, int]:
        """(bytes written into the guest, status) of one request's work."""
        try:
            return work(), VIRTIO_BLK_S_OK
        except RequestError as exc:
            return 0, self._failed(rtype, sector, exc)

    def _failed(self, rtype: int, sector: int, exc: RequestError) -> int:
        """Count and log a request that failed; its status for the guest."""
        self.execute_fails += 1
        log.debug("drive %s: request %d at sector %d: %s", self.path, rtype, sector, exc)
        return exc.status

    def _span_io(self, sector: int, length: int, reading: bool, spans: GuestSpans) -> None:
        """Move a request's data (every buffer between header and status) with one call."""
        offset = self._check_range(sector, length)
        try:
            done = (iovec.preadv if reading else iovec.pwritev)(self.fd, spans.iov, offset, 1, spans.count - 2)
        except OSError as exc:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"I/O error: {exc.strerror}") from None
        if done != length:  # short: the general path loops over the rest
            _, rest = split_views(spans.views()[1:-1], done)
            self._io(os.preadv if reading else os.pwritev, rest, offset + done)
        if reading:
            self.read_count += 1
            self.read_bytes += length
        else:
            self.write_count += 1
            self.write_bytes += length

    @staticmethod
    def _split_status(writable: list[memoryview]) -> tuple[list[memoryview], memoryview]:
        last = writable[-1]
        data_in = writable[:-1] + ([last[:-1]] if len(last) > 1 else [])
        return data_in, last[len(last) - 1:]

    def _dispatch(self, rtype: int, sector: int, data_out: list[memoryview],
                  data_in: list[memoryview]) -> int:
        if rtype == VIRTIO_BLK_T_IN:
            return self._read(sector, data_in)
        if rtype == VIRTIO_BLK_T_OUT:
            self._write(sector, data_out)
        elif rtype == VIRTIO_BLK_T_FLUSH:
            self._flush()
        elif rtype == VIRTIO_BLK_T_GET_ID:
            return scatter(data_in, self.drive_id.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
        elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and not self.read_only:
            self._ranges(rtype, data_out)
        elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            raise RequestError(VIRTIO_BLK_S_IOERR, "discard or write-zeroes on a read-only drive")
        else:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")
        return 0

    def _check_range(self, sector: int, length: int) -> int:
        """The byte offset of an I/O, after checking it lies inside the disk."""
        if length % SECTOR_SIZE:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"length {length} not a multiple of {SECTOR_SIZE}")
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{length >> SECTOR_SHIFT} past the end")
        return sector << SECTOR_SHIFT

    def _read(self, sector: int, views: list[memoryview]) -> int:
        length = sum(map(len, views))
        offset = self._check_range(sector, length)
        self._io(os.preadv, views, offset)
        self.read_count += 1
        self.read_bytes += length
        return length

    def _write(self, sector: int, views: list[memoryview]) -> None:
        if self.read_only:
            raise RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only drive")
        length = sum(map(len, views))
        offset = self._check_range(sector, length)
        self._io(os.pwritev, views, offset)
        self.write_count += 1
        self.write_bytes += length

    def _io(self, call, views: list[memoryview], offset: int) -> None:
        """Run preadv/pwritev until every byte moved; short I/O is an I/O error."""
        pending = list(views)
        try:
            while pending:
                done = call(self.fd, pending[:iovec.IOV_MAX], offset)
                if done == 0:
                    raise RequestError(VIRTIO_BLK_S_IOERR, "image ended early")
                offset += done
                _, pending = split_views(pending, done)
        except OSError as exc:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"I/O error: {exc.strerror}") from None

    def _flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"fsync failed: {exc.strerror}") from None
        self.flush_count += 1

    # -- discard and write zeroes (5.2.6.2) ----------------------------------------
    def _ranges(self, rtype: int, data_out: list[memoryview]) -> None:
        payload = gather(data_out)
        count, rest = divmod(len(payload), RANGE_SEGMENT.size)
        if rest or not 0 < count <= MAX_RANGE_SEGMENTS:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"{len(payload)} bytes of range segments")
        segments = [RANGE_SEGMENT.unpack_from(payload, i * RANGE_SEGMENT.size) for i in range(count)]
        for sector, sectors, flags in segments:
            self._check_segment(rtype, sector, sectors, flags)
        for sector, sectors, flags in segments:
            offset, length = sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT
            if rtype == VIRTIO_BLK_T_DISCARD:
                self._discard(offset, length)
            else:
                self._write_zeroes(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))

    def _check_segment(self, rtype: int, sector: int, sectors: int, flags: int) -> None:
        allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if rtype == VIRTIO_BLK_T_WRITE_ZEROES else 0
        if flags & ~allowed:
            raise RequestError(VIRTIO_BLK_S_UNSUPP, f"range flags {flags:#x}")
        if sectors > MAX_RANGE_SECTORS:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"range of {sectors} sectors too long")
        self._check_range(sector, sectors << SECTOR_SHIFT)

    def _discard(self, offset: int, length: int) -> None:
        """Punch a hole; discard is a hint, so a file system without holes just ignores it."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise RequestError(VIRTIO_BLK_S_IOERR, f"discard failed: {exc.strerror}") from None

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []
        for mode in modes + [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise RequestError(VIRTIO_BLK_S_IOERR, f"write zeroes failed: {exc.strerror}") from None
        self._write_zero_bytes(offset, length)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, ZERO_CHUNK))
        try:
            while length:
                done = os.pwrite(self.fd, zeros[:length], offset)
                offset, length = offset + done, length - done
        except OSError as exc:
            raise RequestError(VIRTIO_BLK_S_IOERR, f"write zeroes failed: {exc.strerror}") from None
