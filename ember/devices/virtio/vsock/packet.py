"""The virtio-vsock packet header and its constants (VIRTIO 1.2 section 5.10.6).

Every packet on the rx and tx queues is a 44-byte little-endian
struct virtio_vsock_hdr followed by `len` bytes of payload (RW only).
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass

HEADER = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HEADER_SIZE = HEADER.size  # 44

HOST_CID = 2  # VMADDR_CID_HOST: the device answers for it
TYPE_STREAM = 1

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
KNOWN_OPS = frozenset(range(OP_REQUEST, OP_CREDIT_REQUEST + 1))

SHUTDOWN_RCV = 1  # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

MAX_PAYLOAD = 64 * 1024  # the largest RW payload either side sends (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
U32_MASK = 0xFFFFFFFF


@dataclass
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return HEADER.pack(*astuple(self))
