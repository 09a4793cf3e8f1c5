"""The disk move every online level change makes (agent/levels.py, DiskMove), against the
fake QEMU: what it asks QEMU in order, and how each failure is undone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fake_qemu import FakeQemu
from ftvm.agent.levels import DiskMove, LevelContext
from ftvm.core.model import DiskSpec, Level, LevelChange, NicSpec, VmSpec
from ftvm.store.pool import OwnershipLost

SPEC = VmSpec("web", Level.RESTART, 256, 1, (DiskSpec("/s/web.img"),), (NicSpec("52:54:00:00:00:01"),))
CHANGE = LevelChange(level=2, source="h1", token=7, requested=0.0)


class Journal:
    def event(self, vm: str, kind: str, message: str) -> None:
        pass


class Host:
    """The host's context as the move sees it (no store is needed below 0.5 s of copying)."""
    me, journal, store = "h1", Journal(), None


def script_block_jobs(fake: FakeQemu, vanish: bool = False) -> None:
    """blockdev-mirror starts a job that is ready at once; block-job-cancel ends it (or,
    `vanish`, the job is gone before it is ready: an I/O error on the target)."""
    jobs: dict[str, dict[str, Any]] = {}

    def mirror(args: dict[str, Any]) -> dict[str, Any]:
        if not vanish:
            jobs[args["job-id"]] = {"device": args["job-id"], "ready": True, "offset": 1, "len": 1}
        return {}

    def cancel(args: dict[str, Any]) -> dict[str, Any]:
        jobs.pop(args["device"], None)
        return {}
    fake.on("blockdev-mirror", mirror)
    fake.on("block-job-cancel", cancel)
    fake.on("query-block-jobs", lambda args: list(jobs.values()))
    for cmd in ("blockdev-add", "blockdev-del", "blockdev-reopen"):
        fake.on(cmd, lambda args: {})


async def start(tmp_path: Path, vanish: bool = False) -> tuple[FakeQemu, LevelContext, str]:
    fake = FakeQemu(tmp_path / "run")
    script_block_jobs(fake, vanish)
    qemu = await fake.start_vm(SPEC)
    target = tmp_path / "local" / "disk0.img"
    target.parent.mkdir()
    target.write_bytes(b"")  # exists: nothing to create
    ctx = LevelContext(Host(), "web", 7, qemu, lambda spec, i: None, lambda img: img)  # type: ignore[arg-type]
    return fake, ctx, str(target)


async def test_a_move_copies_stops_commits_then_switches(tmp_path: Path) -> None:
    fake, ctx, target = await start(tmp_path)
    try:
        async with DiskMove(ctx, CHANGE) as move:
            await move.add(0, target, "raw", 1 << 20)
            await move.copy()
            await move.stop()
            move.committed()
        await move.switch(["disk0-image"])
        assert fake.commands() == ["blockdev-add", "blockdev-mirror", "query-block-jobs", "stop",
                                   "block-job-cancel", "query-block-jobs", "blockdev-reopen", "blockdev-del", "cont"]
        assert dict(fake.calls)["blockdev-mirror"]["copy-mode"] == "write-blocking"
    finally:
        await fake.close()


async def test_a_copy_that_fails_is_cancelled_and_the_guest_never_stopped(tmp_path: Path) -> None:
    fake, ctx, target = await start(tmp_path, vanish=True)
    undone: list[str] = []

    async def undo(e: BaseException) -> None:
        undone.append(str(e))
    try:
        with pytest.raises(RuntimeError, match="ended early"):
            async with DiskMove(ctx, CHANGE) as move:
                move.undo(undo)
                await move.add(0, target, "raw", 1 << 20)
                await move.copy()
        assert "stop" not in fake.commands() and "cont" not in fake.commands()
        assert fake.commands()[-1] == "blockdev-del"  # the new node removed
        assert undone and "ended early" in undone[0]
    finally:
        await fake.close()


async def test_a_failed_commit_undoes_in_order_and_the_guest_continues(tmp_path: Path) -> None:
    fake, ctx, target = await start(tmp_path)
    order: list[str] = []

    def step(name: str):  # type: ignore[no-untyped-def]
        async def undo(e: BaseException) -> None:
            order.append(name)
        return undo
    try:
        with pytest.raises(RuntimeError, match="etcd said no"):
            async with DiskMove(ctx, CHANGE) as move:
                move.undo(step("first registered"))
                await move.add(0, target, "raw", 1 << 20)
                await move.copy()
                await move.stop()
                move.undo(step("second registered"))
                raise RuntimeError("etcd said no")
        assert order == ["second registered", "first registered"]
        assert fake.commands()[-1] == "cont" and fake.status == "running"
    finally:
        await fake.close()


async def test_ownership_lost_undoes_nothing_the_guest_stays_stopped(tmp_path: Path) -> None:
    """The caller kills this copy: continuing the guest would let a second copy write."""
    fake, ctx, target = await start(tmp_path)
    try:
        with pytest.raises(OwnershipLost):
            async with DiskMove(ctx, CHANGE) as move:
                await move.add(0, target, "raw", 1 << 20)
                await move.copy()
                await move.stop()
                raise OwnershipLost("another host owns the VM")
        assert fake.status == "paused" and "cont" not in fake.commands()
        assert fake.commands().count("blockdev-del") == 0
    finally:
        await fake.close()


class StubL3:
    """The level 3 runtime as the raise sees it before the commit: relays opened, then closed."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def open_relays(self, bridge: str, attach: bool = True) -> None:
        self.calls.append("open_relays")

    async def close(self) -> None:
        self.calls.append("close")


@pytest.mark.parametrize("stopped_copy", [False, True])
async def test_a_failed_raise_to_level_3_leaves_the_guest_running_in_its_old_qemu(
        tmp_path: Path, stopped_copy: bool) -> None:
    from types import SimpleNamespace

    from ftvm.agent.levels import SystemTarget, raise_to_system, running_disks
    from ftvm.core.model import HostInfo, PoolSnapshot

    old, ctx, _ = await start(tmp_path)
    hosts = {h: HostInfo(h, 4096, 4, ("/s",), replication_addr=f"10.79.0.{i}") for i, h in enumerate(("h1", "h2"), 1)}
    snap = PoolSnapshot(5, hosts, {})
    ctx.host.latest = lambda: snap  # type: ignore[attr-defined]
    old.on("query-named-block-nodes", lambda args: [{"node-name": "disk0", "image": {"virtual-size": 1 << 20}}])
    old.migrate_states = ["active", "failed"]
    old.migrate_error = "Unable to write to socket"
    new = FakeQemu(tmp_path / "l3run")
    started: list[Any] = []
    l3 = StubL3()

    async def start_qemu(spec: VmSpec, blockdevs: list[list[dict[str, Any]]]) -> Any:
        started.append(await new.start_vm(spec))
        return started[-1]
    files = SimpleNamespace(disks=[tmp_path / "l3" / "disk0.raw"], ram=tmp_path / "ram" / "pc.ram")
    files.disks[0].parent.mkdir()
    target = SystemTarget(files=files, run_dir=tmp_path / "l3run", start_qemu=start_qemu,
                          make_l3=lambda spec: l3, bridge="br0", stopped_copy=stopped_copy)  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(RuntimeError, match="Unable to write to socket"):
            await raise_to_system(ctx, SPEC, LevelChange(level=3, source="h1", token=7, requested=0.0),
                                  running_disks(SPEC), target)
        commands = old.commands()
        assert "migrate_cancel" in commands and commands.index("migrate_cancel") > commands.index("migrate")
        assert "block-job-cancel" in commands and commands[-1] != "migrate"
        assert old.status == "running"  # the guest goes on in the old QEMU
        assert ("stop" in commands) is stopped_copy and (commands[-1] == "cont") is stopped_copy
        assert started and not started[0].alive  # the new QEMU is gone
        assert l3.calls == ["open_relays", "close"]
    finally:
        await new.close()
        await old.close()
