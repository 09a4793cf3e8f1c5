"""Reader for the ledger guest's on-disk records (see ledger.c for the layout).

Used by tests, the demo and benchmarks to check, from the host, that every
record the client saw acknowledged is on the VM's disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
MAGIC = b"FTLG"
MAX_PAYLOAD = 480
_HEADER = struct.Struct("<4sIQII")  # magic, version, seq, length, checksum


@dataclass(frozen=True)
class Record:
    seq: int
    checksum: int
    payload: bytes


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def encode(seq: int, payload: bytes) -> bytes:
    """Build the sector the guest would write (used by unit tests)."""
    payload = payload[:MAX_PAYLOAD]
    body = bytearray(SECTOR)
    _HEADER.pack_into(body, 0, MAGIC, 1, seq, len(payload), 0)
    body[24 : 24 + len(payload)] = payload
    checksum = fnv1a(bytes(body))
    struct.pack_into("<I", body, 20, checksum)
    return bytes(body)


def decode(sector: bytes, expect_seq: int) -> Record | None:
    """The record in this sector, or None if it is not a valid record `expect_seq`."""
    if len(sector) < SECTOR:
        return None
    magic, version, seq, length, checksum = _HEADER.unpack_from(sector, 0)
    if magic != MAGIC or version != 1 or seq != expect_seq or length > MAX_PAYLOAD:
        return None
    zeroed = bytearray(sector[:SECTOR])
    zeroed[20:24] = b"\0\0\0\0"
    if fnv1a(bytes(zeroed)) != checksum:
        return None
    return Record(seq=seq, checksum=checksum, payload=bytes(sector[24 : 24 + length]))


def read_records(image: Path, offset: int = 0) -> list[Record]:
    """All valid records of a raw ledger disk image, in order, as the guest would recover them.
    `offset`: where the ledger starts in the image (its partition on a boot disk)."""
    records: list[Record] = []
    with open(image, "rb") as f:
        seq = 1
        while True:
            f.seek(offset + seq * SECTOR)
            rec = decode(f.read(SECTOR), seq)
            if rec is None:
                return records
            records.append(rec)
            seq += 1
