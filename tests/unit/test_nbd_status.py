"""The NBD block-status client (l3/nbd_status.py) against a scripted server: what it
refuses (lengths past their bounds, extents outside the request, other handles)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ftvm.l3 import nbd_status as nbd
from ftvm.l3.disk_writes import pages_of
from ftvm.l3.nbd_status import BitmapReader, Extent, NbdError

SIZE = 1 << 20
CONTEXT = b"qemu:dirty-bitmap:snap"


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def serve(path: Path, status: Callable[[int, int, int], bytes]) -> threading.Thread:
    """A server that negotiates like QEMU, then answers a block status request with
    `status(handle, offset, length)` (raw reply bytes)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def reply(conn: socket.socket, opt: int, kind: int, data: bytes) -> None:
        conn.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, opt, kind, len(data)) + data)

    def run() -> None:
        conn, _ = srv.accept()
        try:
            conn.sendall(nbd.NBDMAGIC + struct.pack(">QH", nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
            _recv(conn, 4)
            while True:
                _, opt, length = struct.unpack(">QII", _recv(conn, 16))
                _recv(conn, length)
                if opt == nbd.OPT_STRUCTURED_REPLY:
                    reply(conn, opt, nbd.REP_ACK, b"")
                elif opt == nbd.OPT_SET_META_CONTEXT:
                    reply(conn, opt, nbd.REP_META_CONTEXT, struct.pack(">I", 9) + CONTEXT)
                    reply(conn, opt, nbd.REP_ACK, b"")
                elif opt == nbd.OPT_GO:
                    reply(conn, opt, nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, SIZE, 0))
                    reply(conn, opt, nbd.REP_ACK, b"")
                    break
            _, _, _, handle, offset, length = struct.unpack(">IHHQQI", _recv(conn, 28))
            conn.sendall(status(handle, offset, length))
            _recv(conn, 28)  # the client's disconnect
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def chunk(handle: int, payload: bytes, kind: int = nbd.REPLY_TYPE_BLOCK_STATUS, done: bool = True,
          size: int | None = None) -> bytes:
    return struct.pack(">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE if done else 0, kind, handle,
                       len(payload) if size is None else size) + payload


def extents(*pairs: tuple[int, int]) -> bytes:
    return struct.pack(">I", 9) + b"".join(struct.pack(">II", n, s) for n, s in pairs)


def test_dirty_extents_are_read_and_adjacent_ones_merged(tmp_path: Path) -> None:
    t = serve(tmp_path / "s", lambda h, off, n: chunk(h, extents((4096, 1), (4096, 1), (8192, 0), (n - 16384, 1))))
    reader = BitmapReader(str(tmp_path / "s"), "snap", "snap")
    try:
        assert reader.size == SIZE
        assert reader.dirty() == [Extent(0, 8192), Extent(16384, SIZE - 16384)]
    finally:
        reader.close()
    t.join(5)


@pytest.mark.parametrize("bad, why", [
    (lambda h, off, n: chunk(h, b"", size=1 << 30), "at most"),
    (lambda h, off, n: chunk(h + 1, extents((n, 1))), "not a structured reply to this request"),
    (lambda h, off, n: chunk(h, extents((n + 4096, 1))), "outside the request"),
    (lambda h, off, n: chunk(h, extents((0, 1))), "outside the request"),
    (lambda h, off, n: chunk(h, b"\0\0\0\x09\0"), "malformed"),
    (lambda h, off, n: chunk(h, struct.pack(">I", 5) + b"x", kind=nbd.REPLY_TYPE_ERROR_BIT | 1), "error 5"),
], ids=["huge chunk", "other handle", "past the end", "empty extent", "torn extent", "server error"])
def test_a_bad_reply_is_refused_with_a_clear_error(tmp_path: Path, bad: Callable[[int, int, int], bytes],
                                                   why: str) -> None:
    t = serve(tmp_path / "s", bad)
    reader = BitmapReader(str(tmp_path / "s"), "snap", "snap")
    try:
        with pytest.raises(NbdError, match=why):
            reader.dirty()
    finally:
        reader.close()
    t.join(5)


def test_pages_of_extents_are_bounded_by_the_disk() -> None:
    got = pages_of([Extent(0, 4096), Extent(8192, 100), Extent(40960, 1 << 20)], npages=12)
    assert got.tolist() == [0, 2, 10, 11]
    assert pages_of([], 12).dtype == np.int64
