"""The level 3 checkpoint engine without QEMU: a Checkpointer on real files and a real
output-commit relay, driven by the fake QEMU (tests/fake_qemu.py), checkpointing to a
real Standby over loopback. Here: a second session after the partner came back."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fake_qemu import FakeQemu
from ftvm.core.model import DiskSpec, Level, NicSpec, VmSpec
from ftvm.l3.channel import LinkConfig
from ftvm.l3.primary import Checkpointer
from ftvm.l3.relay import OutputCommitRelay
from ftvm.l3.standby import ReplicaPaths, Standby, StandbyServer, read_committed
from ftvm.qemu.process import QemuVm

SPEC = VmSpec("trade", Level.SYSTEM, 1, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:03"),))


def script_device_state(fake: FakeQemu) -> None:
    """`migrate` to the checkpointer's Unix socket: the fake QEMU writes a device state."""
    def migrate(args: dict) -> dict:  # type: ignore[type-arg]
        async def send() -> None:
            _, w = await asyncio.open_unix_connection(args["uri"].removeprefix("unix:"))
            w.write(b"device state")
            await w.drain()
            w.close()
        asyncio.get_running_loop().create_task(send())
        return {}
    fake.on("migrate", migrate)


@dataclass
class Rig:
    fake: FakeQemu
    qemu: QemuVm
    relay: OutputCommitRelay
    standby: Standby
    replica: ReplicaPaths
    link: LinkConfig
    ram: Path
    disk: Path
    run: Path
    guest: asyncio.StreamWriter
    tap_peer: socket.socket

    async def session(self, name: str, epochs: int) -> Checkpointer:
        """A protected session that took `epochs` checkpoints, all acknowledged."""
        cp = Checkpointer("trade", self.qemu, [self.relay], self.ram, [self.disk], self.run, 0.05, timeout_s=5.0)
        await cp.prepare_qemu()
        await cp.connect("127.0.0.1", self.link, name)
        await cp.protect()
        for _ in range(epochs - 1):
            await cp.checkpoint()
        while cp.stats.acked < cp.epoch:
            await asyncio.sleep(0.01)
        return cp

    def send_frame(self, frame: bytes) -> None:
        self.guest.write(struct.pack(">I", len(frame)) + frame)


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ram, disk = tmp_path / "ram", tmp_path / "disk0.img"
    for f in (ram, disk):
        with open(f, "wb") as fh:
            fh.truncate(1 << 20)
    fake = FakeQemu(tmp_path / "run")
    script_device_state(fake)
    qemu = await fake.start_vm(SPEC)
    tap, tap_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    relay = OutputCommitRelay(tmp_path / "run" / "nic0.sock", tap.fileno(), gated=False)
    await relay.start()
    _, guest = await asyncio.open_unix_connection(str(tmp_path / "run" / "nic0.sock"))
    replica = ReplicaPaths(tmp_path / "r-ram", (tmp_path / "r-disk0.img",), tmp_path / "r-state", tmp_path / "r-meta")
    standby = Standby("trade", replica)
    key = os.urandom(32)
    server = StandbyServer("127.0.0.1", 0, key, lambda vm, peer, hello: standby, live_within=0.3)
    await server.start()
    try:
        yield Rig(fake, qemu, relay, standby, replica, LinkConfig(server.port, key, "127.0.0.1"), ram, disk,
                  tmp_path / "run", guest, tap_peer)
    finally:
        guest.close()
        await relay.close()
        await server.close()
        tap.close()
        tap_peer.close()
        await fake.close()


async def test_a_second_session_releases_output_on_its_own_acks(tmp_path: Path) -> None:
    """After the partner comes back, a new session checkpoints from epoch 1 again. Output the
    guest sends before that session's first checkpoint is released by its first ack: the
    relay, which served the first session, must not tag it with that session's epochs (it
    did, and a client stalled until the new session had counted as far)."""
    async with rig(tmp_path) as r:
        first = await r.session("s1", 20)
        assert r.relay.epoch == 21  # the relay counts the first session's epochs
        first.unprotect()  # the partner was lost: output flows unprotected
        await first.close()
        while r.standby.connected:
            await asyncio.sleep(0.01)
        # the guest speaks just as the new session gates its output, before its first checkpoint
        r.fake.on("stop", lambda args: r.send_frame(b"said during checkpoint 1") or {})
        second = Checkpointer("trade", r.qemu, [r.relay], r.ram, [r.disk], r.run, 0.05, timeout_s=5.0)
        await second.prepare_qemu()
        await second.connect("127.0.0.1", r.link, "s2")
        await second.protect()  # returns once checkpoint 1 is acknowledged
        r.fake.handlers.pop("stop")
        loop = asyncio.get_running_loop()
        got = await asyncio.wait_for(loop.sock_recv(r.tap_peer, 2048), 10)
        assert got == b"said during checkpoint 1" and second.stats.acked == 1
        await second.close()
        while r.standby.connected:  # its session ends with the connection, before the loop does
            await asyncio.sleep(0.01)


async def test_a_replica_that_missed_a_checkpoint_during_a_takeover_attempt_never_applies_more(
        tmp_path: Path) -> None:
    """A takeover attempt freezes the standby; checkpoints that arrive meanwhile are dropped.
    If the attempt fails (etcd unreachable) and the standby thaws, the next checkpoint's
    pages and device state patch are relative to one it never applied: applying them would
    leave a replica no primary ever had. The session ends instead, the replica still at
    its last commit, and the primary sees the partner lost (and starts over with a copy)."""
    async with rig(tmp_path) as r:
        cp = await r.session("s1", 5)
        assert read_committed(r.replica) is None  # (written only when a start may use it: a freeze)
        assert await r.standby.freeze() == ("s1", 5) == read_committed(r.replica)
        assert r.replica.device_state.read_bytes() == b"device state"
        await cp.checkpoint()  # epoch 6: dropped by the frozen standby
        while r.standby.dropped == 0:
            await asyncio.sleep(0.01)
        r.standby.thaw()
        await cp.checkpoint()  # epoch 7
        await asyncio.wait_for(cp.lost_event.wait(), 10)
        assert "closed" in str(cp.lost)
        assert read_committed(r.replica) == ("s1", 5) and cp.stats.acked == 5
        assert r.standby.committed is not None and r.standby.committed.epoch == 5
        await cp.close()


async def test_the_replica_s_record_on_disk_never_outlives_the_instant_it_describes(tmp_path: Path) -> None:
    """The committed checkpoint is written when a start may use it (a freeze, the end of a
    session). Once a later checkpoint is applied after a thaw, the record goes at once:
    a start must never pair the state of epoch N with RAM and disks of epoch N+1."""
    async with rig(tmp_path) as r:
        cp = await r.session("s1", 3)
        assert await r.standby.freeze() == ("s1", 3)
        r.standby.thaw()  # a takeover attempt that did not happen; nothing was dropped meanwhile
        await cp.checkpoint()
        while cp.stats.acked < 4:
            await asyncio.sleep(0.01)
        assert read_committed(r.replica) is None
        await cp.close()  # the session ends: its last commit is written for a start from here
        while r.standby.connected:
            await asyncio.sleep(0.01)
        assert read_committed(r.replica) == ("s1", 4)


async def test_a_new_interval_applies_at_once_not_after_the_old_one(tmp_path: Path) -> None:
    """`vm set --checkpoint-ms` on a VM checkpointing once an hour: the next epochs come by
    the new setting, not after the hour (a 10 s interval hid a whole benchmark window)."""
    async with rig(tmp_path) as r:
        cp = Checkpointer("trade", r.qemu, [r.relay], r.ram, [r.disk], r.run, 3600.0, timeout_s=5.0)
        await cp.prepare_qemu()
        await cp.connect("127.0.0.1", r.link, "s1")
        await cp.protect()
        task = asyncio.create_task(cp.run())
        try:
            await asyncio.sleep(0.1)  # (run() is waiting out its hour)
            assert cp.epoch == 1
            cp.set_interval(0.01, False)
            await asyncio.wait_for(_epochs(cp, 5), 60)
            cp.set_interval(3600.0, True)  # on output: a held frame starts one at once
            seen = cp.epoch
            await asyncio.sleep(0.1)
            r.send_frame(b"reply")
            await asyncio.wait_for(_epochs(cp, seen + 1), 60)
        finally:
            task.cancel()
            await cp.close()


async def _epochs(cp: Checkpointer, n: int) -> None:
    while cp.epoch < n:
        await asyncio.sleep(0.005)


async def test_a_checkpoint_waits_for_room_on_a_full_link_and_says_how_long(tmp_path: Path) -> None:
    """Checkpoints in flight are bounded (MAX_IN_FLIGHT_*): the next one waits for an ACK
    rather than queue behind the others, and its record says it waited (link-bound)."""
    from ftvm.l3.primary import MAX_IN_FLIGHT_BYTES
    async with rig(tmp_path) as r:
        cp = await r.session("s1", 1)
        cp._in_flight = {cp.epoch + 1: MAX_IN_FLIGHT_BYTES}  # as if a large checkpoint were on the wire
        room = asyncio.create_task(cp._room_on_link())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not room.done() and cp.stats.waiting_since is not None
        await asyncio.sleep(0.05)
        assert cp.stats.window(0.05)["link_bound"] > 0.5  # a wait under way counts at once
        cp._in_flight.clear()  # its ACK came
        cp._acked.set()
        await asyncio.wait_for(room, 5)
        assert cp._link_wait > 0
        await cp.checkpoint()
        assert cp.stats.records[-1].link_wait > 0 and cp.stats.window(60)["link_bound"] > 0
        await cp.checkpoint()
        assert cp.stats.records[-1].link_wait == 0  # no wait, nothing recorded
        await cp.close()
        while r.standby.connected:  # its session ends with the connection, before the loop does
            await asyncio.sleep(0.01)
