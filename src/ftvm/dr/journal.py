"""The DR site's copy of a VM: a base image per disk and a journal of recovery points.

    <dir>/state.json        {"disks": [size, ...], "base_point": n}: the base images hold
                            exactly point n (0: nothing yet, zeros)
    <dir>/disk-<i>.raw      the base images (sparse, raw)
    <dir>/points/<n>.pt     point n: the blocks written between point n-1 and n, all disks

A point file is written as `<n>.pt.part`, synced, then renamed: a point is there whole or
not at all, whatever the link or the host does meanwhile. Its trailer carries a SHA-256 of
everything before it, checked whenever it is read. Every size read from a file is
bounded, and an extent must lie inside its disk.

    header   b"FTVMDRP1", u16 disks, u64 number, f64 taken_at, u64 size x disks
    extent   u16 disk, u64 offset, u32 length, u32 stored, u8 codec (0 raw, 1 zstd), data
    trailer  b"FTVMDRPE", u64 extents, 32-byte SHA-256

Consolidation (core/dr_points.py) applies old points to the base images in order, each
idempotent (absolute data at absolute offsets): after a crash midway it is simply applied
again, because `base_point` moves only after the images are synced. A point dropped from
the middle is folded into the next kept one, rewritten under the same rules.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from ..core.dr_points import Consolidation, PointInfo, Retention, consolidation, to_keep

MAGIC = b"FTVMDRP1"
END = b"FTVMDRPE"
HEADER = struct.Struct(">8sHQd")
EXTENT = struct.Struct(">HQIIB")
TRAILER = struct.Struct(">8sQ32s")
RAW, ZSTD = 0, 1
MAX_EXTENT = 32 << 20     # bytes of one extent, as written to the disk
MAX_DISKS = 64
MAX_DISK_SIZE = 1 << 50
COMPRESS_LEVEL = 1


FAILED_OVER = "failed-over"  # marker file in a replica's directory
FINAL = "final"              # the number of a failback's last point, not yet installed (agent/dr_site.py)


class JournalError(RuntimeError):
    pass


@dataclass(frozen=True)
class Extent:
    disk: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class PointHeader:
    number: int
    taken_at: float
    sizes: tuple[int, ...]


def _check_extent(sizes: tuple[int, ...], disk: int, offset: int, length: int) -> None:
    if disk >= len(sizes):
        raise JournalError(f"extent on disk {disk}: the VM has {len(sizes)} disks")
    if not 0 < length <= MAX_EXTENT or offset < 0 or offset + length > sizes[disk]:
        raise JournalError(f"extent {offset}+{length} outside disk {disk} ({sizes[disk]} bytes) or too large")


class PointWriter:
    """One point being written (`<n>.pt.part`); `commit` makes it a point."""

    def __init__(self, path: Path, header: PointHeader) -> None:
        if not 0 < len(header.sizes) <= MAX_DISKS or not all(0 < s <= MAX_DISK_SIZE for s in header.sizes):
            raise JournalError(f"point {header.number}: bad disk sizes {header.sizes}")
        self.path, self.header = path, header
        self.part = path.with_name(path.name + ".part")
        self.file: BinaryIO = open(self.part, "wb")
        self.hash = hashlib.sha256()
        self.extents = 0
        self.raw_bytes = 0  # a point holds each block once: never more than the disks
        self._compress = zstandard.ZstdCompressor(level=COMPRESS_LEVEL)
        self._write(HEADER.pack(MAGIC, len(header.sizes), header.number, header.taken_at)
                    + b"".join(struct.pack(">Q", s) for s in header.sizes))

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    def add(self, disk: int, offset: int, data: bytes, packed: bytes | None = None) -> None:
        """`packed`: `data` compressed already (zstd)."""
        _check_extent(self.header.sizes, disk, offset, len(data))
        self._count(len(data))
        if packed is None:
            packed = self._compress.compress(data)
        codec, stored = (ZSTD, packed) if len(packed) < len(data) else (RAW, data)
        self._write(EXTENT.pack(disk, offset, len(data), len(stored), codec) + stored)
        self.extents += 1

    def add_packed(self, disk: int, offset: int, length: int, packed: bytes) -> None:
        """An extent as it came over the link, compressed: stored as it is, once it is
        known to inflate to exactly `length` bytes (at most that many are inflated)."""
        _check_extent(self.header.sizes, disk, offset, length)
        self._count(length)
        try:
            if zstandard.frame_content_size(packed) != length:
                raise JournalError(f"extent at {offset}: its frame does not hold {length} bytes")
            data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=length)
        except zstandard.ZstdError as e:
            raise JournalError(f"extent at {offset} does not inflate: {e}") from None
        if len(data) != length:
            raise JournalError(f"extent at {offset} inflates to {len(data)} bytes, not {length}")
        self._write(EXTENT.pack(disk, offset, length, len(packed), ZSTD) + packed)
        self.extents += 1

    def _count(self, length: int) -> None:
        self.raw_bytes += length
        if self.raw_bytes > sum(self.header.sizes):
            raise JournalError(f"point {self.header.number} holds more than its disks ({sum(self.header.sizes)} bytes)")

    def commit(self) -> None:
        self.file.write(TRAILER.pack(END, self.extents, self.hash.digest()))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.part, self.path)
        _sync_dir(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)


def _sync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise JournalError(f"{what}: the file ends early")
    return data


def read_point(path: Path, sizes: tuple[int, ...] | None = None) -> tuple[PointHeader, list[Extent]]:
    """A point's extents with their data, once its checksum is verified. `sizes`: the disks
    it must describe (the replica's)."""
    header, locators = _scan(path, sizes)
    return header, [Extent(loc.disk, loc.offset, _load(loc)) for loc in locators]


@dataclass(frozen=True)
class Locator:
    """Where an extent's data sits in its point file."""

    disk: int
    offset: int
    length: int
    path: Path
    data_pos: int
    stored: int
    codec: int


def scan_point(path: Path, sizes: tuple[int, ...]) -> list[Locator]:
    """A point's extents without their data, once its checksum is verified (streamed: a
    point may be larger than memory)."""
    return _scan(path, sizes)[1]


def _scan(path: Path, sizes: tuple[int, ...] | None) -> tuple[PointHeader, list[Locator]]:
    body_size = os.path.getsize(path) - TRAILER.size
    if body_size < HEADER.size:
        raise JournalError(f"{path.name}: too short for a point")
    out = []
    with open(path, "rb") as f:
        digest = hashlib.sha256()
        left = body_size
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise JournalError(f"{path.name}: the file ends early")
            digest.update(chunk)
            left -= len(chunk)
        end, count, want = TRAILER.unpack(_read_exact(f, TRAILER.size, path.name))
        if end != END or digest.digest() != want:
            raise JournalError(f"{path.name}: checksum mismatch (a damaged point)")
        f.seek(0)
        magic, disks, number, taken_at = HEADER.unpack(_read_exact(f, HEADER.size, path.name))
        if magic != MAGIC or not 0 < disks <= MAX_DISKS:
            raise JournalError(f"{path.name}: not a point file")
        got = tuple(struct.unpack(">Q", _read_exact(f, 8, path.name))[0] for _ in range(disks))
        if sizes is not None and got != sizes:
            raise JournalError(f"{path.name}: disk sizes {got}, the replica's are {sizes}")
        for _ in range(count):
            disk, offset, length, stored, codec = EXTENT.unpack(_read_exact(f, EXTENT.size, path.name))
            _check_extent(got, disk, offset, length)
            if stored > MAX_EXTENT + (MAX_EXTENT >> 6) or codec not in (RAW, ZSTD):
                raise JournalError(f"{path.name}: bad extent record")
            out.append(Locator(disk, offset, length, path, f.tell(), stored, codec))
            f.seek(stored, os.SEEK_CUR)
        if f.tell() != body_size:
            raise JournalError(f"{path.name}: bytes after the last extent")
    return PointHeader(number, taken_at, got), out


class NewestImage:
    """Reads of the replica's newest point: the base images with every point's extents laid
    over them in order (nothing materialized)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.extents: list[list[tuple[int, int, Locator]]] = [[] for _ in replica.sizes]  # (offset, order, loc)
        self.order = 0
        for n in replica.numbers():
            self.add_point(n)

    def add_point(self, number: int) -> None:
        for loc in scan_point(self.replica.point_path(number), self.replica.sizes):
            self.order += 1
            bisect.insort(self.extents[loc.disk], (loc.offset, self.order, loc))

    def read(self, disk: int, offset: int, length: int) -> bytes:
        with open(self.replica.disk_path(disk), "rb") as f:
            buf = bytearray(os.pread(f.fileno(), length, offset).ljust(length, b"\0"))
        index = self.extents[disk]
        lo = bisect.bisect_left(index, (offset - MAX_EXTENT,))
        hits = [e for e in index[lo:bisect.bisect_left(index, (offset + length,))]
                if e[0] + e[2].length > offset]
        for _, _, loc in sorted(hits, key=lambda e: e[1]):
            data = _load(loc)
            a, b = max(offset, loc.offset), min(offset + length, loc.offset + loc.length)
            buf[a - offset:b - offset] = data[a - loc.offset:b - loc.offset]
        return bytes(buf)


def _load(loc: Locator) -> bytes:
    """An extent's data (inflated to at most its stated length)."""
    with open(loc.path, "rb") as f:
        data = os.pread(f.fileno(), loc.stored, loc.data_pos)
    if len(data) != loc.stored:
        raise JournalError(f"{loc.path.name}: the file ends early")
    if loc.codec == ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=loc.length)
        except zstandard.ZstdError as e:
            raise JournalError(f"{loc.path.name}: extent does not inflate: {e}") from None
    if len(data) != loc.length:
        raise JournalError(f"{loc.path.name}: extent holds {len(data)} bytes, says {loc.length}")
    return data


class Replica:
    """A VM's copy at the DR site (see the module's docstring)."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.points_dir = d / "points"
        state = json.loads((d / "state.json").read_text())
        self.sizes = tuple(int(s) for s in state["disks"])
        self.base_point = int(state["base_point"])
        self.id = str(state["id"])  # a new replica (made again) is another one to a sender

    @staticmethod
    def create(d: Path, sizes: tuple[int, ...], seed: list[tuple[Path, str]] | None = None) -> Replica:
        """`seed`: (image, format) per disk to start from instead of zeros (a failback: the
        VM's old copy at its home site, so that the first point, a diff, sends only what
        changed since). A seed of another size is not used."""
        if (d / "state.json").exists():
            raise JournalError(f"{d}: a replica is there already")
        (d / "points").mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(sizes):
            base = d / f"disk-{i}.raw"
            if seed is not None and i < len(seed) and _seed(seed[i], base) and base.stat().st_size == size:
                continue
            with open(base, "wb") as f:
                f.truncate(0)
                f.truncate(size)
        Replica._write_state(d, sizes, 0, os.urandom(8).hex())
        return Replica(d)

    @staticmethod
    def _write_state(d: Path, sizes: tuple[int, ...], base_point: int, rid: str) -> None:
        tmp = d / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"disks": list(sizes), "base_point": base_point, "id": rid}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / "state.json")
        _sync_dir(d)

    def save_spec(self, spec: dict[str, object]) -> None:
        """The VM's spec as its owner last sent it (what a DR failover starts)."""
        tmp = self.dir / "spec.json.tmp"
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, self.dir / "spec.json")

    def spec(self) -> dict[str, object] | None:
        path = self.dir / "spec.json"
        return json.loads(path.read_text()) if path.exists() else None

    def disk_path(self, i: int) -> Path:
        return self.dir / f"disk-{i}.raw"

    def point_path(self, number: int) -> Path:
        return self.points_dir / f"{number}.pt"

    def numbers(self) -> list[int]:
        """The committed points, oldest first (a `.part` is not a point)."""
        out = []
        for p in self.points_dir.glob("*.pt"):
            if p.stem.isdigit() and int(p.stem) > self.base_point:
                out.append(int(p.stem))
        return sorted(out)

    def newest(self) -> int:
        numbers = self.numbers()
        return numbers[-1] if numbers else self.base_point

    def begin(self, number: int, taken_at: float) -> PointWriter:
        if number <= self.newest():
            raise JournalError(f"point {number} is not newer than point {self.newest()}")
        return PointWriter(self.point_path(number), PointHeader(number, taken_at, self.sizes))

    def header(self, number: int) -> PointHeader:
        """Point `number`'s header (read alone: its extents are checked when they are read)."""
        path = self.point_path(number)
        with open(path, "rb") as f:
            magic, disks, got, taken_at = HEADER.unpack(_read_exact(f, HEADER.size, path.name))
            if magic != MAGIC or got != number or disks != len(self.sizes):
                raise JournalError(f"{path.name}: not point {number} of this replica")
        return PointHeader(number, taken_at, self.sizes)

    def tested(self) -> set[int]:
        return {int(p.name.split(".")[0]) for p in self.points_dir.glob("*.tested") if p.name.split(".")[0].isdigit()}

    def mark_tested(self, number: int) -> None:
        (self.points_dir / f"{number}.tested").touch()

    def data_bytes(self, number: int) -> int:
        """Disk content point `number` holds (each block written since the point before it)."""
        return sum(loc.length for loc in scan_point(self.point_path(number), self.sizes))

    def mark_failed_over(self) -> None:
        """The VM runs at this (DR) site now: this replica takes no more points (synced: a
        restarted receiver must still refuse them)."""
        with open(self.dir / FAILED_OVER, "w") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())
        _sync_dir(self.dir)

    def mark_final(self, number: int) -> None:
        """Point `number` is a failback's last: this (home) host installs it as the VM's images,
        again after a failure or a restart, until that is done and the replica removed. Synced
        before the point is acknowledged (the DR pool then stops its copy)."""
        with open(self.dir / FINAL, "w") as f:
            f.write(f"{number}\n")
            f.flush()
            os.fsync(f.fileno())
        _sync_dir(self.dir)

    @staticmethod
    def final_point(d: Path) -> int | None:
        try:
            number = int((d / FINAL).read_text().strip())
        except (OSError, ValueError):
            return None
        return number if number > 0 else None

    @staticmethod
    def unfence(d: Path) -> None:
        """A failback: the VM runs at its home site again, and this replica takes its points."""
        (d / FAILED_OVER).unlink(missing_ok=True)

    @staticmethod
    def is_failed_over(d: Path) -> bool:
        return (d / FAILED_OVER).exists()

    def retain(self, policy: Retention, now: float) -> Consolidation:
        """Consolidate the points `policy` does not keep (core/dr_points.py); returns what was done."""
        tested = self.tested()
        infos = [PointInfo(n, self.header(n).taken_at, n in tested) for n in self.numbers()]
        plan = consolidation([p.number for p in infos], to_keep(infos, now, policy))
        for n in plan.into_base:
            self.apply_to_base(n)
        for older, into in plan.merges:
            self.fold(older, into)
        for n in tested - set(self.numbers()):
            (self.points_dir / f"{n}.tested").unlink(missing_ok=True)
        return plan

    # --- consolidation ---------------------------------------------------------------------
    def apply_to_base(self, number: int) -> None:
        """Point `number`, the oldest, into the base images; then it is gone."""
        numbers = self.numbers()
        if not numbers or numbers[0] != number:
            raise JournalError(f"point {number} is not the oldest point ({numbers[:1]})")
        _apply(self.point_path(number), self.sizes, [self.disk_path(i) for i in range(len(self.sizes))])
        self._write_state(self.dir, self.sizes, number, self.id)
        self.base_point = number
        self.point_path(number).unlink()

    def fold(self, older: int, into: int) -> None:
        """Point `older` folded into the newer point `into`: `into` then holds the blocks
        both wrote, its own winning, and `older` is gone."""
        if not older < into:
            raise JournalError(f"cannot fold point {older} into {into}")
        old = scan_point(self.point_path(older), self.sizes)
        new = scan_point(self.point_path(into), self.sizes)
        writer = PointWriter(self.point_path(into), self.header(into))
        try:  # one extent in memory at a time: a point may be larger than memory
            for loc, a, b in _uncovered(old, new):
                data = _load(loc)
                writer.add(loc.disk, a, data[a - loc.offset:b - loc.offset])
            for loc in new:
                writer.add(loc.disk, loc.offset, _load(loc))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.point_path(older).unlink()

    # --- images of a point ---------------------------------------------------------------
    def materialize(self, number: int, dest: Path) -> list[Path]:
        """Raw images of point `number` in `dest` (copies: reflinked where the file system
        can, else written out; the replica is never touched)."""
        if number != self.base_point and number not in self.numbers():
            raise JournalError(f"no point {number} (points: {self.numbers() or 'none'}, base {self.base_point})")
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for i in range(len(self.sizes)):
            target = dest / f"disk-{i}.raw"
            proc = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(self.disk_path(i)), str(target)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise JournalError(f"copying disk {i}: {proc.stderr.strip()}")
            out.append(target)
        for n in self.numbers():
            if n > number:
                break
            _apply(self.point_path(n), self.sizes, out)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir)


def _seed(image: tuple[Path, str], dest: Path) -> bool:
    path, fmt = image
    cmd = (["cp", "--reflink=auto", "--sparse=always", str(path), str(dest)] if fmt == "raw"
           else ["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", str(path), str(dest)])
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _apply(point: Path, sizes: tuple[int, ...], paths: list[Path]) -> None:
    """A point's extents written over `paths` (checked first, then one extent at a time)."""
    locators = scan_point(point, sizes)
    fds = [os.open(p, os.O_WRONLY) for p in paths]
    try:
        for loc in locators:
            os.pwrite(fds[loc.disk], _load(loc), loc.offset)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _uncovered(old: list[Locator], new: list[Locator]) -> Iterator[tuple[Locator, int, int]]:
    """The parts [a, b) of `old` extents that no `new` extent (same disk) overwrites."""
    covered: dict[int, list[tuple[int, int]]] = {}
    for e in new:
        covered.setdefault(e.disk, []).append((e.offset, e.offset + e.length))
    for spans in covered.values():
        spans.sort()
    for e in old:
        start, end = e.offset, e.offset + e.length
        at = start
        for a, b in covered.get(e.disk, []):
            if b <= at or a >= end:
                continue
            if a > at:
                yield e, at, a
            at = max(at, b)
            if at >= end:
                break
        if at < end:
            yield e, at, end
