"""The DR pool's end of DR replication: takes recovery points from the owners of the VMs
it protects and journals them (dr/journal.py), one replica per source pool and VM.

A session (dr/wire.py) is accepted only from a pool whose pairing key this host holds,
for one VM at a time. The receiver tells the sender where its replica stands (DR_STATE),
and whether the VM was failed over to this pool (then the session ends there: a source
told so stops the VM and never starts it again, docs/dr.md). A probe session (HELLO
`probe`) only asks that: a source host asks before it starts the VM after an outage.
Otherwise the sender sends each point as an increment on that (its dirty bitmaps continue from
the point the receiver has) or as a diff (hashes of every block of the point's image,
compared here with the newest point's: only what differs is sent). A point is committed
only on DR_COMMIT, after every extent was checked and written: the newest point is
always whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.dr_points import Retention
from ..core.model import NAME_RE, DrContact, VmSpec
from ..core.records import RecordError, from_fields
from ..l3.channel import Channel, accept_session, read_hello, refuse
from ..l3.wire import Msg, WireError
from .journal import MAX_DISK_SIZE, MAX_DISKS, JournalError, NewestImage, PointWriter, Replica
from .wire import (BLOCK, RECEIVER_LIMITS, ZSTD, decode_extent, decode_hashes, decode_json, decode_number,
                   encode_json, encode_number, encode_want)

log = logging.getLogger("ftvm.dr.receiver")

IDLE_S = 300.0   # a session silent this long is closed (senders send at least every point)


@dataclass(frozen=True)
class Committed:
    pool: str
    vm: str
    number: int
    taken_at: float
    stored_bytes: int


def block_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class Receiver:
    def __init__(self, root: Path, key_for: Callable[[str], bytes | None],
                 on_commit: Callable[[Committed], None] = lambda c: None,
                 retention: Retention | None = None,
                 on_contact_end: Callable[[str, str], None] = lambda pool, vm: None,
                 on_final: Callable[[Committed], None] = lambda c: None,
                 seed: Callable[[str, str, tuple[int, ...]], list[tuple[Path, str]] | None] = lambda p, v, s: None,
                 failover_asked: Callable[[str, str], Awaitable[bool]] | None = None) -> None:
        """`root`: replicas go to root/<pool>/<vm>; `key_for(pool)`: the pairing key of a
        source pool (None: not paired); `on_contact_end(pool, vm)`: a session ended (its
        contact record is saved); `on_final`: a failback's last point was committed (its
        source stopped the VM after it); `seed(pool, vm, sizes)`: images a new replica
        starts from (dr/journal.py), None for zeros; `failover_asked(pool, vm)`: whether this
        host's pool has a failover of the VM asked (a quorum read; raises when it cannot tell)."""
        self.root, self.key_for, self.on_commit, self.on_contact_end = root, key_for, on_commit, on_contact_end
        self.on_final, self.seed, self.failover_asked = on_final, seed, failover_asked
        self.fenced: set[tuple[str, str]] = set()  # failed over here: never a point again (and on disk)
        self.asked: set[tuple[str, str]] = set()   # a failover asked in this pool (any host): no points
        self.retention = retention or Retention()
        self.live: dict[tuple[str, str], asyncio.Task[Any]] = {}  # the session of each VM
        self.contacts: dict[tuple[str, str], DrContact] = {}     # what each source last said
        self.server: asyncio.Server | None = None

    def replica_dir(self, pool: str, vm: str) -> Path:
        return self.root / pool / vm

    def contact(self, pool: str, vm: str) -> DrContact:
        """What this host last heard of the VM's source (kept across restarts)."""
        got = self.contacts.get((pool, vm))
        return got if got is not None else load_contact(self.replica_dir(pool, vm))

    def fence(self, pool: str, vm: str, quiet_s: float) -> bool:
        """The VM is failed over to this pool: no more points from its source, and every answer
        from here on says so; only if this host heard nothing from the source (a point, a
        heartbeat, a probe it answered "not failed over") for `quiet_s`. Checked and set with
        no await between: no answer can slip in. Then `seal` makes it last (on disk)."""
        if time.time() - self.contact(pool, vm).heard_at < quiet_s:
            return False
        self.fenced.add((pool, vm))
        return True

    async def seal(self, pool: str, vm: str) -> None:
        """After `fence`: marked on disk (a restarted receiver still refuses), its session ended."""
        d = self.replica_dir(pool, vm)
        await asyncio.to_thread(Replica(d).mark_failed_over)
        task = self.live.get((pool, vm))
        if task is not None:  # (ended before the caller picks its point: no commit after)
            task.cancel()
            with suppress(BaseException):
                await task

    def unfence(self, pool: str, vm: str) -> None:
        """A failback: the VM runs at its home site again, and this replica takes its points."""
        Replica.unfence(self.replica_dir(pool, vm))
        self.fenced.discard((pool, vm))

    def set_asked(self, asked: set[tuple[str, str]]) -> None:
        """The failovers asked in this pool (its store, each tick): their sessions end here too,
        on every receiver, and every answer says "failed over"."""
        for key in asked - self.asked:
            self._end_session(*key)
        self.asked = set(asked)

    def _end_session(self, pool: str, vm: str) -> None:
        task = self.live.get((pool, vm))
        if task is not None:
            task.cancel()

    async def _failed_over(self, pool: str, vm: str) -> bool:
        """What this host says of the VM: failed over here, or asked anywhere in its pool.
        Raises when it cannot tell (its pool's store unreachable)."""
        if (pool, vm) in self.fenced or (pool, vm) in self.asked:
            return True
        if await asyncio.to_thread(Replica.is_failed_over, self.replica_dir(pool, vm)):
            return True
        return await self.failover_asked(pool, vm) if self.failover_asked is not None else False

    async def serve(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            hello, body = await read_hello(reader)
            pool, vm, sizes = _check_hello(hello)
        except (WireError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            log.warning("DR session from %s refused: %s", peer, e)
            with suppress(Exception):
                await refuse(writer, str(e))
            return
        key = self.key_for(pool)
        if key is None:
            log.warning("DR session for %s/%s from %s refused: pool not paired with this DR pool", pool, vm, peer)
            await refuse(writer, "pool not paired with this DR pool")
            return
        me = asyncio.current_task()
        assert me is not None
        live = False
        try:
            ch = await accept_session(reader, writer, key, body)
            try:
                failed_over = await self._failed_over(pool, vm)
            except Exception as e:  # (no word at all beats a wrong one: the source asks elsewhere)
                log.warning("DR session for %s/%s from %s: no answer, this host cannot tell whether its pool "
                            "took the VM over: %s", pool, vm, peer, e)
                return
            if hello.get("probe") or failed_over:
                # (only ever said inside an authenticated session: a forged "failed over"
                # would stop the VM at its source)
                if not failed_over:  # a word to the source: a failover here waits it out too
                    self._heard(pool, vm)
                    with suppress(OSError):
                        await asyncio.to_thread(save_contact, self.replica_dir(pool, vm), self.contact(pool, vm))
                await self._answer(ch, pool, vm, failed_over or (pool, vm) in self.fenced)
                return
            # The newest authenticated session of a VM wins: its owner changed (a failover, a
            # migration), and the old owner's connection may be half-open for minutes. The
            # old session's point in flight is dropped; the new sender sees where we stand.
            old = self.live.get((pool, vm))
            if old is not None:
                log.info("DR session for %s/%s from %s replaces the one before", pool, vm, peer)
                old.cancel()
                with suppress(BaseException):
                    await old
            self.live[(pool, vm)] = me
            live = True
            confirm = hello.get("confirm_s")
            self._heard(pool, vm, confirm_s=float(confirm) if isinstance(confirm, (int, float)) else None)
            await self._session(ch, pool, vm, sizes, hello.get("spec"))
        except (WireError, JournalError, RecordError, OSError, asyncio.IncompleteReadError,
                asyncio.TimeoutError) as e:
            log.warning("DR session for %s/%s from %s ended: %s", pool, vm, peer, e)
        except asyncio.CancelledError:  # (a newer session, or a failover's fence: ended here, quietly)
            log.info("DR session for %s/%s from %s ended by this host", pool, vm, peer)
        finally:
            if self.live.get((pool, vm)) is me:
                del self.live[(pool, vm)]
            if live:
                with suppress(OSError):
                    await asyncio.to_thread(save_contact, self.replica_dir(pool, vm), self.contact(pool, vm))
                self.on_contact_end(pool, vm)
            writer.close()

    async def _answer(self, ch: Channel, pool: str, vm: str, failed_over: bool) -> None:
        """A probe's answer, or a failed-over VM's: where the replica stands, and that."""
        d = self.replica_dir(pool, vm)
        newest, rid = 0, ""
        if (d / "state.json").exists():
            rep = await asyncio.to_thread(Replica, d)
            newest, rid = await asyncio.to_thread(rep.newest), rep.id
        await ch.send(encode_json(Msg.DR_STATE, {"replica": rid, "newest": newest, "newest_taken_at": 0.0,
                                                 "failed_over": failed_over}))
        await ch.writer.drain()

    def _heard(self, pool: str, vm: str, confirm_s: float | None = None, in_flight: int | None = None,
               taken_at: float | None = None) -> None:
        c = self.contact(pool, vm)
        self.contacts[(pool, vm)] = DrContact(
            heard_at=time.time(), confirm_s=c.confirm_s if confirm_s is None else confirm_s,
            in_flight_bytes=c.in_flight_bytes if in_flight is None else in_flight,
            in_flight_taken_at=c.in_flight_taken_at if taken_at is None else taken_at)

    def _replica(self, pool: str, vm: str, sizes: tuple[int, ...]) -> Replica:
        d = self.root / pool / vm
        if not (d / "state.json").exists():
            return Replica.create(d, sizes, self.seed(pool, vm, sizes))
        rep = Replica(d)
        if rep.sizes != sizes:
            raise JournalError(f"disk sizes changed ({rep.sizes} here, {sizes} sent): "
                               "the DR replica must be made again")
        return rep

    async def _session(self, ch: Channel, pool: str, vm: str, sizes: tuple[int, ...], spec: Any) -> None:
        rep = await asyncio.to_thread(self._replica, pool, vm, sizes)
        if spec is not None:  # what a DR failover starts (checked like any spec read from a store)
            checked = VmSpec.from_json(spec)
            if checked.name != vm or len(checked.disks) != len(sizes):
                raise WireError(f"HELLO's spec is of VM {checked.name!r} with {len(checked.disks)} disks")
            await asyncio.to_thread(rep.save_spec, checked.to_json())
        newest = rep.newest()
        newest_at = rep.header(newest).taken_at if newest > rep.base_point else 0.0
        await ch.send(encode_json(Msg.DR_STATE, {"replica": rep.id, "newest": newest, "newest_taken_at": newest_at}))
        await ch.writer.drain()
        image: NewestImage | None = None
        point: PointWriter | None = None
        final = False
        try:
            while True:
                kind, payload = await asyncio.wait_for(ch.receive(RECEIVER_LIMITS), IDLE_S)
                self._heard(pool, vm, in_flight=point.raw_bytes if point is not None else 0)
                if kind is Msg.HEARTBEAT:
                    continue
                if kind is Msg.DR_BEGIN:
                    if point is not None:
                        raise WireError("DR_BEGIN inside a point")
                    begin = decode_json(payload, "DR_BEGIN")
                    number, taken_at = begin.get("number"), begin.get("taken_at")
                    if not isinstance(number, int) or not isinstance(taken_at, (int, float)):
                        raise WireError("DR_BEGIN without number and taken_at")
                    point = rep.begin(number, float(taken_at))
                    final = begin.get("final") is True
                    self._heard(pool, vm, in_flight=0, taken_at=float(taken_at))
                elif point is None:
                    raise WireError(f"{kind.name} outside a point")
                elif kind is Msg.DR_HASHES:
                    if image is None:
                        image = await asyncio.to_thread(NewestImage, rep)
                    disk, first, hashes = decode_hashes(payload, list(sizes))
                    differs = await asyncio.to_thread(_differing, image, sizes[disk], disk, first, hashes)
                    await ch.send(encode_want(disk, first, differs))
                    await ch.writer.drain()
                elif kind is Msg.DR_EXTENT:
                    disk, offset, length, codec, data = decode_extent(payload)
                    if codec == ZSTD:
                        await asyncio.to_thread(point.add_packed, disk, offset, length, data)
                    else:
                        point.add(disk, offset, data, packed=data)  # (raw on the link: stored raw)
                elif kind is Msg.DR_COMMIT:
                    number = decode_number(payload, "DR_COMMIT")
                    if number != point.header.number:
                        raise WireError(f"DR_COMMIT of point {number} inside point {point.header.number}")
                    await asyncio.to_thread(point.commit)
                    stored = point.path.stat().st_size
                    header, point = point.header, None
                    self._heard(pool, vm, in_flight=0, taken_at=0.0)
                    plan = await asyncio.to_thread(rep.retain, self.retention, time.time())
                    if plan.into_base or plan.merges:
                        image = None  # (its index points into files consolidation changed)
                    elif image is not None:
                        await asyncio.to_thread(image.add_point, number)
                    committed = Committed(pool, vm, number, header.taken_at, stored)
                    self.on_commit(committed)
                    if final:  # (marked before the ACK: an acknowledged last point is always installed)
                        await asyncio.to_thread(rep.mark_final, number)
                        self.on_final(committed)
                    await ch.send(encode_number(Msg.DR_ACK, number))
                    await ch.writer.drain()
        finally:
            if point is not None:
                point.abort()


def _differing(image: NewestImage, size: int, disk: int, first: int, hashes: list[bytes]) -> list[bool]:
    out = []
    for i, h in enumerate(hashes):
        offset = (first + i) * BLOCK
        out.append(block_hash(image.read(disk, offset, min(BLOCK, size - offset))) != h)
    return out


def load_contact(d: Path) -> DrContact:
    try:
        return from_fields(DrContact, json.loads((d / "contact.json").read_text()), "DR contact")
    except (OSError, ValueError, RecordError):
        return DrContact()


def save_contact(d: Path, contact: DrContact) -> None:
    """(Not synced: it states what the source last said, for a failover's loss statement.)"""
    if not d.is_dir():
        return
    tmp = d / "contact.json.tmp"
    tmp.write_text(json.dumps(asdict(contact)))
    os.replace(tmp, d / "contact.json")


def _check_hello(hello: dict[str, Any]) -> tuple[str, str, tuple[int, ...]]:
    pool, vm, sizes = hello.get("pool"), hello.get("vm"), hello.get("sizes")
    if hello.get("probe") is True:
        sizes = []  # (a probe names no disks: it reads nothing)
    elif (not isinstance(sizes, list) or not 0 < len(sizes) <= MAX_DISKS
            or not all(isinstance(s, int) and 0 < s <= MAX_DISK_SIZE and s % 512 == 0 for s in sizes)):
        raise WireError("HELLO without valid disk sizes")
    if not isinstance(pool, str) or not NAME_RE.fullmatch(pool):
        raise WireError("HELLO without a valid pool name")
    if not isinstance(vm, str) or not NAME_RE.fullmatch(vm):
        raise WireError("HELLO without a valid VM name")
    return pool, vm, tuple(sizes)
