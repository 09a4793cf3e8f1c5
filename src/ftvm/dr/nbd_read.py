"""Reading an NBD export's data (a recovery point's fleecing node) over a Unix socket:
fixed newstyle, NBD_OPT_GO, simple replies. Every length from the server is bounded."""

from __future__ import annotations

import socket
import struct

from ..l3.nbd_status import (CMD_DISC, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, MAX_OPTION_REPLY,
                             NBDMAGIC, OPT_GO, OPT_REPLY_MAGIC, REP_ACK, REP_ERROR_BIT, REP_INFO, REQUEST_MAGIC,
                             SIMPLE_REPLY_MAGIC, NbdError)

CMD_READ = 0
MAX_READ = 32 << 20


class NbdReader:
    def __init__(self, path: str, export: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.size = 0
        self._handle = 0
        try:
            self.sock.connect(path)
            self._handshake(export.encode())
        except BaseException:
            self.sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise NbdError(0, "the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, name: bytes) -> None:
        magic, opt = struct.unpack(">8sQ", self._recv(16))
        (flags,) = struct.unpack(">H", self._recv(2))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(0, "not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            magic, got, kind, length = struct.unpack(">QIII", self._recv(20))
            if magic != OPT_REPLY_MAGIC or got != OPT_GO or length > MAX_OPTION_REPLY:
                raise NbdError(0, "unexpected NBD option reply")
            body = self._recv(length)
            if kind & REP_ERROR_BIT:
                raise NbdError(0, f"NBD export {name.decode(errors='replace')} refused: "
                                      f"{body.decode(errors='replace')[:200]}")
            if kind == REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == INFO_EXPORT:
                (self.size,) = struct.unpack(">Q", body[2:10])
            if kind == REP_ACK:
                break
        if self.size <= 0:
            raise NbdError(0, "the NBD export gave no size")

    def read(self, offset: int, length: int) -> bytes:
        if not 0 < length <= MAX_READ or offset < 0 or offset + length > self.size:
            raise NbdError(0, f"read {offset}+{length} outside the export ({self.size} bytes)")
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle, offset, length))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError(0, "unexpected NBD reply")
        if error:
            raise NbdError(error, f"NBD read {offset}+{length} failed (error {error})")
        return self._recv(length)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()
