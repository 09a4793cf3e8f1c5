"""Reading a QEMU dirty bitmap over NBD (l3/nbd_status.py) from a real
qemu-storage-daemon: the extents written since the last snapshot, exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ftvm.qemu.cmdline import listening_socket
from ftvm.l3.nbd_status import BitmapReader, Extent, NbdError

MIB = 1 << 20


@pytest.fixture
async def qsd(tmp_path: Path) -> AsyncIterator[tuple[QMPClient, Path]]:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    nbd, qmp_sock = tmp_path / "nbd.sock", tmp_path / "qmp.sock"
    mon = listening_socket(qmp_sock)  # (non-blocking: see qemu/cmdline.monitor)
    proc = subprocess.Popen([
        "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={disk}",
        "--blockdev", "driver=raw,node-name=d,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=w,node-name=d,name=w,writable=on",
        "--chardev", f"socket,id=m,fd={mon},server=on,wait=on", "--monitor", "chardev=m"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=[mon])
    os.close(mon)
    qmp = QMPClient("test")
    try:
        for _ in range(500):
            if qmp_sock.exists():
                break
            await asyncio.sleep(0.01)
        await qmp.connect(str(qmp_sock))
        await qmp.execute("block-dirty-bitmap-add", {"node": "d", "name": "live", "granularity": 4096})
        yield qmp, nbd
    finally:
        await qmp.disconnect()
        proc.kill()
        proc.wait()


def write(nbd: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw", f"nbd+unix:///w?socket={nbd}"]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args, check=True, capture_output=True)


async def snapshot(qmp: QMPClient, n: int) -> str:
    """As a checkpoint does (guest stopped): the epoch's writes into a frozen bitmap, exported."""
    name = f"snap{n}"
    await qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": name, "granularity": 4096,
                                                    "disabled": True}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "d", "target": name, "bitmaps": ["live"]}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "d", "name": "live"}}]})
    await qmp.execute("block-export-add", {"type": "nbd", "id": name, "node-name": "d", "name": name,
                                           "bitmaps": [name]})
    return name


async def drop(qmp: QMPClient, name: str) -> None:
    await qmp.execute("block-export-del", {"id": name})
    for _ in range(100):
        exports = await qmp.execute("query-block-exports")
        if not any(e["id"] == name for e in exports):
            break
        await asyncio.sleep(0.01)
    await qmp.execute("block-dirty-bitmap-remove", {"node": "d", "name": name})


async def test_the_dirty_extents_are_exactly_what_was_written_in_each_epoch(qsd: tuple[QMPClient, Path]) -> None:
    qmp, nbd = qsd
    write(nbd, "write -P 1 1M 4k", "write -P 2 10M 64k", "write -P 3 10304k 4k")  # the last one adjoins
    name = await snapshot(qmp, 1)
    reader = BitmapReader(str(nbd), name, name)
    try:
        assert reader.size == 64 * MIB
        assert reader.dirty() == [Extent(MIB, 4096), Extent(10 * MIB, 64 * 1024 + 4096)]
    finally:
        reader.close()
    await drop(qmp, name)
    write(nbd, "write -P 4 63M 8k")
    name = await snapshot(qmp, 2)
    reader = BitmapReader(str(nbd), name, name)
    try:
        assert reader.dirty() == [Extent(63 * MIB, 8192)]  # only this epoch's
    finally:
        reader.close()
    await drop(qmp, name)
    name = await snapshot(qmp, 3)
    reader = BitmapReader(str(nbd), name, name)
    try:
        assert reader.dirty() == []
    finally:
        reader.close()


async def test_an_export_without_the_bitmap_is_refused_clearly(qsd: tuple[QMPClient, Path]) -> None:
    _, nbd = qsd
    with pytest.raises(NbdError, match="has no qemu:dirty-bitmap:live"):
        BitmapReader(str(nbd), "w", "live")


class Qmp:
    """QMPClient as QemuVm.execute presents it: every failure a QmpError."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    async def execute(self, cmd: str, args: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
        from qemu.qmp import ExecuteError

        from ftvm.qemu.process import QmpError
        try:
            return await self.client.execute(cmd, args)
        except ExecuteError as e:
            raise QmpError(cmd, str(e), e.error_class) from e


async def bitmaps(client: QMPClient) -> set[str]:
    nodes = await client.execute("query-named-block-nodes", {"flat": True})
    return {b["name"] for n in nodes if n["node-name"] == "d" for b in n.get("dirty-bitmaps", [])}


async def test_the_engine_s_disk_writes_per_epoch_and_their_cleanup(qsd: tuple[QMPClient, Path],
                                                                     tmp_path: Path) -> None:
    """DiskWrites as a checkpoint drives it (its own NBD server, the next epoch's bitmaps
    added, this epoch's read over its open connection while the guest is stopped, then the
    next one's opened and this one's removed): each epoch's extents exactly, nothing of
    ours left behind."""
    from ftvm.l3.disk_writes import PREFIX, DiskWrites
    client, _ = qsd
    qmp = Qmp(client)
    await client.execute("nbd-server-stop")  # the fixture's: DiskWrites starts its own
    earlier = DiskWrites(qmp, ["d"], tmp_path / "bitmaps.sock")
    await earlier.start()  # a session that died without cleaning up: its bitmap stays behind
    writes = DiskWrites(qmp, ["d"], tmp_path / "bitmaps.sock")
    await writes.start()
    assert await bitmaps(client) == {"live", *writes.names(1)}  # the earlier session's is gone
    await client.execute("block-export-add", {"type": "nbd", "id": "w", "node-name": "d", "name": "w",
                                              "writable": True})
    sock = tmp_path / "bitmaps.sock"

    async def checkpoint() -> list[list[Extent]]:
        for cmd, args in writes.rotate():  # (behind `stop`: the guest writes nothing until `cont`)
            await qmp.execute(cmd, args)
        extents = await asyncio.to_thread(writes.read)
        for cmd, args in writes.exports():  # (behind `cont`)
            await qmp.execute(cmd, args)
        return extents

    try:
        write(sock, "write -P 9 2M 4k", "write -P 9 3M 4k")
        assert await checkpoint() == [[Extent(2 * MIB, 4096), Extent(3 * MIB, 4096)]]
        write(sock, "write -P 8 5M 8k")  # after `cont`, before the bitmaps moved on: the next epoch's
        await writes.advance()
        assert await bitmaps(client) == {"live", *writes.names(2)}  # epoch 1's is gone, tracking goes on
        assert await checkpoint() == [[Extent(5 * MIB, 8192)]]
        await writes.advance()
        assert await checkpoint() == [[]]
        await writes.advance()
        write(sock, "write -P 7 63M 4k")
        assert await checkpoint() == [[Extent(63 * MIB, 4096)]]
    finally:
        await writes.close()
    assert not {b for b in await bitmaps(client) if b.startswith(PREFIX)}


async def test_a_checkpoint_without_an_open_bitmap_connection_fails(qsd: tuple[QMPClient, Path],
                                                                   tmp_path: Path) -> None:
    from ftvm.l3.disk_writes import DiskWrites
    client, _ = qsd
    await client.execute("nbd-server-stop")
    writes = DiskWrites(Qmp(client), ["d"], tmp_path / "bitmaps.sock")
    await writes.start()
    try:
        await client.execute("nbd-server-stop")  # the connection dies
        with pytest.raises(OSError):  # (NbdError, or the socket's own)
            await asyncio.to_thread(writes.read)
    finally:
        await writes.close()
