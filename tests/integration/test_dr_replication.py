"""DR replication on a real QEMU block layer (qemu-storage-daemon, two disks) to a receiver
over loopback: a point reads as both disks were at the one instant of its cut while writes
go on, holds exactly the blocks written since the point before, a point not delivered is
carried by the next; the DR site's image of each point is the disks at its cut, whether
it came as an increment or, for a new sender, as a diff."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from ftvm.qemu.cmdline import listening_socket
from ftvm.dr.capture import GRANULARITY, PointCapture
from ftvm.qemu.process import QemuError

MIB = 1 << 20
SIZE = 16 * MIB


class Qmp:
    """QMPClient with ftvm's error type (what the agent's QEMU wrapper raises)."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.client.execute(cmd, args)
        except ExecuteError as e:
            raise QemuError(str(e)) from None


@pytest.fixture
async def qsd(tmp_path: Path) -> AsyncIterator[tuple[Qmp, Path, Path]]:
    nbd, qmp_sock = tmp_path / "nbd.sock", tmp_path / "qmp.sock"
    args = ["--nbd-server", f"addr.type=unix,addr.path={nbd}"]
    for i in range(2):
        disk = tmp_path / f"disk{i}.raw"
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        args += ["--blockdev", f"driver=file,node-name=f{i},filename={disk}",
                 "--blockdev", f"driver=raw,node-name=disk{i},file=f{i}",
                 "--export", f"type=nbd,id=w{i},node-name=disk{i},name=w{i},writable=on"]
    mon = listening_socket(qmp_sock)  # (non-blocking: see qemu/cmdline.monitor)
    proc = subprocess.Popen(["qemu-storage-daemon", *args,
                             "--chardev", f"socket,id=m,fd={mon},server=on,wait=on", "--monitor", "chardev=m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=[mon])
    os.close(mon)
    client = QMPClient("test")
    try:
        for _ in range(500):
            if qmp_sock.exists():
                break
            await asyncio.sleep(0.01)
        await client.connect(str(qmp_sock))
        yield Qmp(client), nbd, tmp_path
    finally:
        await client.disconnect()
        proc.kill()
        proc.wait()


def write(nbd: Path, disk: int, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw", f"nbd+unix:///w{disk}?socket={nbd}"]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args, check=True, capture_output=True)


async def image_of(cap: PointCapture, taken, full: bool) -> tuple[list[list], list[bytearray]]:  # type: ignore[no-untyped-def]
    """The point's extents, and what they say over zeroed disks."""
    extents = await asyncio.to_thread(cap.extents, taken, full)
    images = [bytearray(SIZE) for _ in range(2)]
    for disk in range(2):
        for offset, data in await asyncio.to_thread(lambda d=disk: list(cap.read(taken, d, extents[d]))):
            images[disk][offset:offset + len(data)] = data
    return extents, images


async def test_a_point_is_the_instant_of_its_cut_on_every_disk(qsd: tuple[Qmp, Path, Path]) -> None:
    qmp, nbd, work = qsd
    cap = PointCapture(qmp, ["disk0", "disk1"], work, nbd)
    await cap.start()
    write(nbd, 0, "write -P 0x11 0 64k", "write -P 0x12 5M 4k")
    write(nbd, 1, "write -P 0x21 1M 128k")
    p1 = await cap.take()
    # written after the cut: point 1 must not see it
    write(nbd, 0, "write -P 0x99 0 64k")
    write(nbd, 1, "write -P 0x98 1M 4k", "write -P 0x97 8M 64k")
    extents, images = await image_of(cap, p1, full=True)
    assert images[0][:65536] == b"\x11" * 65536 and images[0][5 * MIB:5 * MIB + 4096] == b"\x12" * 4096
    assert images[1][MIB:MIB + 131072] == b"\x21" * 131072 and images[1][8 * MIB:8 * MIB + 4] == b"\0" * 4
    await cap.release(p1, delivered=True)
    assert not list(work.glob("*.qcow2"))  # the fleecing files are gone

    p2 = await cap.take()
    extents, images = await image_of(cap, p2, full=False)
    # exactly the blocks written between the two cuts (64 KiB granularity)
    assert [[(e.offset, e.length) for e in d] for d in extents] == [[(0, GRANULARITY)],
                                                                     [(MIB, GRANULARITY), (8 * MIB, GRANULARITY)]]
    assert images[0][:65536] == b"\x99" * 65536
    assert images[1][MIB:MIB + 4096] == b"\x98" * 4096 and images[1][MIB + 4096:MIB + 8192] == b"\x21" * 4096
    await cap.release(p2, delivered=False)  # not delivered: the next point carries its blocks

    write(nbd, 0, "write -P 0x55 2M 4k")
    p3 = await cap.take()
    extents, _ = await image_of(cap, p3, full=False)
    assert [[e.offset for e in d] for d in extents] == [[0, 2 * MIB], [MIB, 8 * MIB]]
    await cap.release(p3, delivered=True)
    nodes = [n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})]
    assert not [n for n in nodes if n.startswith("ftvm-dr-")]
    bitmaps = [b["name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})
               for b in n.get("dirty-bitmaps", [])]
    assert sorted(bitmaps) == sorted([cap.bitmap(4, 0), cap.bitmap(4, 1)])  # only the next point's records
    await cap.stop()  # DR turned off: nothing of it is left on the QEMU
    assert not [b["name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})
                for b in n.get("dirty-bitmaps", [])]


async def test_points_shipped_to_a_receiver_are_the_disks_at_each_cut(qsd: tuple[Qmp, Path, Path]) -> None:
    import os
    import shutil

    from ftvm.dr.journal import Replica
    from ftvm.dr.receiver import Receiver
    from ftvm.dr.sender import DrError, DrSender
    qmp, nbd, work = qsd
    key = os.urandom(32)
    commits = []
    receiver = Receiver(work / "dr", lambda pool: key if pool == "main" else None, commits.append)
    port = await receiver.serve("127.0.0.1", 0)
    cuts: dict[int, list[bytes]] = {}

    def disks() -> list[bytes]:
        return [(work / f"disk{i}.raw").read_bytes() for i in range(2)]

    try:
        cap = PointCapture(qmp, ["disk0", "disk1"], work, nbd)
        await cap.start()
        from ftvm.core.model import DiskSpec, Level, VmSpec
        spec = VmSpec("web", Level.COMPONENT, 256, 1, (DiskSpec(size=SIZE), DiskSpec(size=SIZE)), ())
        sender = DrSender(cap, "web", "main", key, ("127.0.0.1", port), spec.to_json())
        write(nbd, 0, "write -P 0x11 0 1M", "write -P 0x12 9M 64k")
        write(nbd, 1, "write -P 0x21 3M 256k")
        saved = disks()
        first = await sender.ship()
        cuts[first.number] = saved
        assert first.kind == "diff" and first.number == 1
        # only the blocks that differ from the (empty) replica went: 1 MiB + 64 KiB + 256 KiB
        assert first.data_bytes == (1024 + 64 + 256) << 10
        write(nbd, 0, "write -P 0x13 512k 4k")
        write(nbd, 1, "write -P 0x22 15M 64k")
        saved = disks()
        second = await sender.ship()
        cuts[second.number] = saved
        assert second.kind == "incremental" and second.data_bytes == 2 * GRANULARITY
        # a receiver that refuses (another key): not delivered, and the next point carries it
        write(nbd, 0, "write -P 0x14 6M 4k")
        stranger = DrSender(cap, "web", "main", os.urandom(32), ("127.0.0.1", port))
        with pytest.raises(DrError):
            await stranger.ship()
        write(nbd, 1, "write -P 0x23 0 4k")
        saved = disks()
        third = await sender.ship()
        cuts[third.number] = saved
        assert third.kind == "incremental" and third.data_bytes == 2 * GRANULARITY
        # (the old sender's session stays open, as a dead owner's half-open connection would)

        # a new owner (failover, migration, agent restart): its session replaces the old one,
        # and with no bitmap history its first point is a diff
        cap2 = PointCapture(qmp, ["disk0", "disk1"], work, nbd)
        await cap2.start()
        write(nbd, 0, "write -P 0x15 12M 64k")
        saved = disks()
        fresh = DrSender(cap2, "web", "main", key, ("127.0.0.1", port))
        fourth = await fresh.ship()
        cuts[fourth.number] = saved
        assert fourth.kind == "diff" and fourth.data_bytes == GRANULARITY
        hashes = 2 * (SIZE // GRANULARITY) * 16
        assert fourth.wire_bytes < hashes + 4 * GRANULARITY  # hashes and one block, not the disks
        fresh.close()
        sender.close()
    finally:
        await receiver.close()
    rep = Replica(work / "dr" / "main" / "web")
    assert VmSpec.from_json(rep.spec()) == spec  # what a failover at the DR site starts
    assert rep.numbers() == [1, 2, 3, 4] and [c.number for c in commits] == [1, 2, 3, 4]
    for n, expected in cuts.items():
        images = rep.materialize(n, work / f"point{n}")
        assert [p.read_bytes() for p in images] == expected, n
        shutil.rmtree(work / f"point{n}")


async def test_a_fenced_replica_says_so_only_inside_an_authenticated_session(qsd: tuple[Qmp, Path, Path]) -> None:
    """A failover fences the replica: the source's next session and any probe are told
    "failed over" (after authentication: a stranger learns nothing and can forge nothing),
    no point is taken any more, and what the receiver last heard is kept for the failover's
    loss statement."""
    import os

    from ftvm.dr.journal import Replica
    from ftvm.dr.receiver import Receiver, load_contact
    from ftvm.dr.sender import DrError, DrSender, FailedOver, probe
    qmp, nbd, work = qsd
    key = os.urandom(32)
    ended: list[tuple[str, str]] = []
    receiver = Receiver(work / "dr", lambda pool: key if pool == "main" else None,
                        on_contact_end=lambda pool, vm: ended.append((pool, vm)))
    port = await receiver.serve("127.0.0.1", 0)
    addr = ("127.0.0.1", port)
    try:
        # before any point: a probe says "not failed over", and makes no replica
        assert (await probe(addr, key, "main", "web"))["failed_over"] is False
        assert not (work / "dr" / "main" / "web").exists()
        with pytest.raises(DrError):
            await probe(addr, os.urandom(32), "main", "web")  # (a stranger's key: no answer at all)
        cap = PointCapture(qmp, ["disk0", "disk1"], work, nbd)
        await cap.start()
        sender = DrSender(cap, "web", "main", key, addr, confirm_s=42.0)
        write(nbd, 0, "write -P 0x31 0 64k")
        first = await sender.ship()
        contact = receiver.contact("main", "web")
        assert contact.confirm_s == 42.0 and contact.heard_at >= first.taken_at and contact.in_flight_bytes == 0
        assert not receiver.fence("main", "web", quiet_s=60.0)  # (heard just now: it may start the VM)
        assert receiver.fence("main", "web", quiet_s=0.0)
        assert (await probe(addr, key, "main", "web"))["failed_over"] is True  # (said at once, before the seal)
        await receiver.seal("main", "web")  # on disk; ends the live session too
        assert Replica.is_failed_over(work / "dr" / "main" / "web") and ended == [("main", "web")]
        assert load_contact(work / "dr" / "main" / "web").heard_at == contact.heard_at  # (saved at its end)
        state = await probe(addr, key, "main", "web")
        assert state["failed_over"] is True and state["newest"] == first.number
        write(nbd, 0, "write -P 0x32 64k 64k")
        with pytest.raises(DrError) as failed:
            await sender.ship()  # (on its old session, which the fence closed: a failure first, maybe)
        if not isinstance(failed.value, FailedOver):
            with pytest.raises(FailedOver):
                await sender.ship()
        assert Replica(work / "dr" / "main" / "web").numbers() == [first.number]
        sender.close()
    finally:
        await receiver.close()


async def test_a_probe_is_a_word_and_a_failover_asked_anywhere_in_the_pool_is_said_everywhere(
        tmp_path: Path) -> None:
    """A probe answered "not failed over" lets the source start the VM: the receiver counts it
    as contact, so a failover there waits it out. A failover asked in the DR pool is said by
    every receiver of the pool, also one keeping no replica of the VM; a receiver that cannot
    read its pool's store gives no answer at all (the source asks another)."""
    import os

    from ftvm.dr.receiver import Receiver
    from ftvm.dr.sender import DrError, probe
    key = os.urandom(32)
    store: dict[str, bool | None] = {"asked": False}

    async def asked(pool: str, vm: str) -> bool:
        if store["asked"] is None:
            raise OSError("etcd unreachable")
        return bool(store["asked"])

    receiver = Receiver(tmp_path / "dr", lambda pool: key, failover_asked=asked)
    addr = ("127.0.0.1", await receiver.serve("127.0.0.1", 0))
    try:
        assert (await probe(addr, key, "main", "web"))["failed_over"] is False
        assert time.time() - receiver.contact("main", "web").heard_at < 5
        assert not receiver.fence("main", "web", quiet_s=30.0)  # the source may start it now
        store["asked"] = True  # (asked on another host of this pool, seen by a quorum read)
        assert (await probe(addr, key, "main", "web"))["failed_over"] is True
        store["asked"] = False
        receiver.set_asked({("main", "web")})  # (seen in this host's snapshot)
        assert (await probe(addr, key, "main", "web"))["failed_over"] is True
        receiver.set_asked(set())
        store["asked"] = None
        with pytest.raises(DrError):
            await probe(addr, key, "main", "web")
    finally:
        await receiver.close()
