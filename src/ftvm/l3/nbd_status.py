"""Level 3: read a QEMU dirty bitmap over NBD (the `qemu:dirty-bitmap:NAME` metadata
context and NBD_CMD_BLOCK_STATUS), which QMP cannot show. A small client of the NBD
protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): fixed
newstyle handshake, structured replies, one metadata context, block status only.

It talks to this host's own QEMU over a Unix socket in the VM's private run directory,
but still trusts nothing it reads: every length is bounded and every reply checked
against what was asked.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
STRUCTURED_REPLY_MAGIC = 0x668E33EF
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
DIRTY = 1  # qemu:dirty-bitmap status flag: the extent is dirty

MAX_OPTION_REPLY = 1 << 16      # option replies carry names and info: small
MAX_STATUS_PAYLOAD = 1 << 24    # a block status chunk: 8 bytes per extent, 2M extents
MAX_REQUEST = (1 << 32) - (1 << 20)  # one block status request covers at most this (u32 length)


class NbdError(OSError):
    pass


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int


class BitmapReader:
    """One connection to an NBD export that carries a dirty bitmap."""

    def __init__(self, path: str, export: str, bitmap: str, timeout: float = 5.0) -> None:
        self.export, self.context = export, f"qemu:dirty-bitmap:{bitmap}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._handle = 0
        self.size = 0
        self.context_id = -1
        try:
            self.sock.connect(path)
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    # --- the handshake ------------------------------------------------------------------
    def _handshake(self) -> None:
        magic, opt = struct.unpack(">8sQ", self._read(16))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NbdError(0, "not an NBD server (newstyle)")
        (flags,) = struct.unpack(">H", self._read(2))
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(0, "the NBD server lacks fixed newstyle negotiation")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY, b"")
        self._expect_ack(OPT_STRUCTURED_REPLY)
        name = self.export.encode()
        query = self.context.encode()
        self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query))
                     + query)
        while True:
            kind, data = self._option_reply(OPT_SET_META_CONTEXT)
            if kind == REP_ACK:
                break
            if kind == REP_META_CONTEXT and len(data) >= 4 and data[4:] == query:
                (self.context_id,) = struct.unpack(">I", data[:4])
        if self.context_id < 0:
            raise NbdError(0, f"the NBD export {self.export} has no {self.context}")
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            kind, data = self._option_reply(OPT_GO)
            if kind == REP_ACK:
                break
            if kind == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                (self.size,) = struct.unpack(">Q", data[2:10])
        if self.size <= 0:
            raise NbdError(0, f"the NBD export {self.export} gave no size")

    def _option(self, opt: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, got, kind, length = struct.unpack(">QIII", self._read(20))
        if magic != OPT_REPLY_MAGIC or got != opt:
            raise NbdError(0, f"unexpected NBD option reply (option {got}, asked {opt})")
        if length > MAX_OPTION_REPLY:
            raise NbdError(0, f"NBD option reply of {length} bytes (at most {MAX_OPTION_REPLY})")
        data = self._read(length)
        if kind & REP_ERROR_BIT:
            raise NbdError(0, f"NBD option {opt} refused ({kind & ~REP_ERROR_BIT}): "
                              f"{data.decode(errors='replace')[:200]}")
        return kind, data

    def _expect_ack(self, opt: int) -> None:
        kind, _ = self._option_reply(opt)
        if kind != REP_ACK:
            raise NbdError(0, f"NBD option {opt}: reply {kind}, not ACK")

    # --- block status ---------------------------------------------------------------------
    def dirty(self) -> list[Extent]:
        """The dirty extents of the whole export, in order (adjacent ones merged)."""
        out: list[Extent] = []
        at = 0
        while at < self.size:
            length = min(self.size - at, MAX_REQUEST)
            covered = self._status(at, length, out)
            if covered <= 0:
                raise NbdError(0, f"NBD block status at {at} covered nothing")
            at += covered
        return out

    def _status(self, offset: int, length: int, out: list[Extent]) -> int:
        self._handle += 1
        handle = self._handle
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_BLOCK_STATUS, handle, offset, length))
        covered = 0
        while True:
            magic, flags, kind, got, size = struct.unpack(">IHHQI", self._read(20))
            if magic != STRUCTURED_REPLY_MAGIC or got != handle:
                raise NbdError(0, "unexpected NBD reply (not a structured reply to this request)")
            if size > MAX_STATUS_PAYLOAD:
                raise NbdError(0, f"NBD reply chunk of {size} bytes (at most {MAX_STATUS_PAYLOAD})")
            payload = self._read(size)
            if kind & REPLY_TYPE_ERROR_BIT:
                code = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else 0
                raise NbdError(code, f"NBD block status failed (error {code})")
            if kind == REPLY_TYPE_BLOCK_STATUS:
                if size < 4 or (size - 4) % 8 or struct.unpack(">I", payload[:4])[0] != self.context_id:
                    raise NbdError(0, "malformed NBD block status chunk")
                at = offset + covered
                for i in range(4, size, 8):
                    ext_len, status = struct.unpack(">II", payload[i:i + 8])
                    if ext_len == 0 or at + ext_len > offset + length:
                        raise NbdError(0, "NBD block status extent outside the request")
                    if status & DIRTY:
                        if out and out[-1].offset + out[-1].length == at:
                            out[-1] = Extent(out[-1].offset, out[-1].length + ext_len)
                        else:
                            out.append(Extent(at, ext_len))
                    at += ext_len
                covered = at - offset
            elif kind != REPLY_TYPE_NONE:
                raise NbdError(0, f"unexpected NBD reply chunk type {kind}")
            if flags & REPLY_FLAG_DONE:
                return covered

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError(0, "the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self._handle += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self._handle, 0, 0))
        except OSError:
            pass
        self.sock.close()
