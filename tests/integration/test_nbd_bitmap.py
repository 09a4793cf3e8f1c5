"""Reading a QEMU dirty bitmap over NBD (l3/nbd_status.py) from a real
qemu-storage-daemon: the extents written since the last snapshot, exactly."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ftvm.l3.nbd_status import BitmapReader, Extent, NbdError

MIB = 1 << 20


@pytest.fixture
async def qsd(tmp_path: Path) -> AsyncIterator[tuple[QMPClient, Path]]:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    nbd, qmp_sock = tmp_path / "nbd.sock", tmp_path / "qmp.sock"
    proc = subprocess.Popen([
        "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={disk}",
        "--blockdev", "driver=raw,node-name=d,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=w,node-name=d,name=w,writable=on",
        "--chardev", f"socket,id=m,path={qmp_sock},server=on,wait=off", "--monitor", "chardev=m"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    """DiskWrites as a checkpoint drives it (its own NBD server, bitmap rotation, read,
    release): each epoch's extents exactly, nothing of ours left behind."""
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
    try:
        write(sock, "write -P 9 2M 4k")
        names = await writes.snapshot()
        assert names == writes.names(1)
        write(sock, "write -P 8 5M 8k")  # after the snapshot: the next epoch's, not this one's
        assert await asyncio.to_thread(writes.read, names) == [[Extent(2 * MIB, 4096)]]
        assert await writes.release(names) == []
        assert await bitmaps(client) == {"live", *writes.names(2)}  # the snapshot is gone, tracking goes on
        assert await writes.release(names) == []  # a retry of a release that had happened: no error
        names = await writes.snapshot()
        assert await asyncio.to_thread(writes.read, names) == [[Extent(5 * MIB, 8192)]]
        assert await writes.release(names) == []
        names = await writes.snapshot()
        assert await asyncio.to_thread(writes.read, names) == [[]]
        assert await writes.release(names) == []
    finally:
        await writes.close()
    assert not {b for b in await bitmaps(client) if b.startswith(PREFIX)}
