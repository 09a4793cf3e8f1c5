"""The level 2 replica manager's failure paths (agent/replica.py), against the fake QEMU
and a real etcd: a failed copy is recorded in the store before the guest writes again,
the graph drops it, and the guest continues on the survivor; with no survivor the failed
I/O is retried now and then; without ownership the guest is never continued."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_fakes import Level2Rig as Rig, level2_rig
from ftvm.core.replication import CopyState
from ftvm.qemu.blockgraph import DiskGraph, Mode

_pools = itertools.count()
MIRRORED = DiskGraph(0, Mode.MIRRORED, 3, "d0-local1", "d0-remote2", "d0-quorum2")


async def until(what: str, cond: Any) -> None:
    for _ in range(1000):
        if await cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def rig(etcd_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with level2_rig(etcd_url, tmp_path, f"rep{next(_pools)}", CopyState.CURRENT, status="io-error") as rig:
        rig.make(MIRRORED).restart()  # the loop, as after `begin`
        yield rig


async def test_a_failed_partner_copy_is_recorded_outdated_then_the_guest_continues_alone(rig: Rig) -> None:
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-remote2", "type": "write"})
    await until("the guest is continued", lambda: _true(rig.fake.status == "running"))
    h2 = (await rig.copies()).state_of("h2")
    assert h2 is not None and h2.state is CopyState.OUTDATED and "replication to h2 failed" in h2.reason
    commands = rig.fake.commands()
    # the store first (the guest is still stopped), then the graph, then cont: never the other way round
    assert commands.index("x-blockdev-change") < commands.index("cont") == len(commands) - 1
    assert rig.replica.graphs[0].mode is Mode.LOCAL_ONLY
    assert "block-dirty-bitmap-add" in commands  # the new local node tracks writes for the resync
    assert any(k == "masked" for k, _ in rig.journal.seen)


async def test_a_failed_local_copy_is_recorded_failed_and_the_guest_runs_on_the_partner(rig: Rig) -> None:
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-local1", "type": "write"})
    await until("the guest is continued", lambda: _true(rig.fake.status == "running"))
    h1 = (await rig.copies()).state_of("h1")
    assert h1 is not None and h1.state is CopyState.FAILED and h1.full
    assert rig.replica.graphs[0].mode is Mode.REMOTE_ONLY


async def test_with_both_copies_failed_the_guest_stays_paused(rig: Rig) -> None:
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-local1", "type": "write"})
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-remote2", "type": "write"})
    await until("the problem is reported", lambda: _true(rig.replica.problem == "both copies failed"))
    assert "cont" not in rig.fake.commands()
    copies = await rig.copies()
    assert {h: c.state for h, c in copies.copies.items()} == {"h1": CopyState.CURRENT, "h2": CopyState.CURRENT}
    assert any(k == "io-error" and "nothing left to continue on" in m for k, m in rig.journal.seen)


async def test_with_nothing_left_the_failed_io_is_retried_until_it_goes_through(rig: Rig) -> None:
    """Both copies failed: the guest stays paused and its I/O is retried now and then (QEMU
    keeps the failed request); while the storage still fails the guest stops again, and once
    it is back the guest continues, with no copy recorded failed."""
    rig.replica.io_retry_first_s = 0.05
    still_failing = [True]

    def cont(args: dict[str, Any]) -> dict[str, Any]:
        if still_failing[0]:  # the retried write fails again: QEMU stops the guest again
            rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-local1", "type": "write"})
            rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-remote2", "type": "write"})
            rig.fake.emit("STOP")
        else:
            rig.fake.status = "running"
        return {}
    rig.fake.on("cont", cont)
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-local1", "type": "write"})
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-remote2", "type": "write"})
    await until("a retry that fails", lambda: _true(rig.fake.commands().count("cont") >= 1))
    assert rig.fake.status == "io-error" and rig.replica.problem == "both copies failed"
    still_failing[0] = False  # the storage is back
    await until("the guest continues", lambda: _true(any(k == "io-resumed" for k, _ in rig.journal.seen)))
    assert rig.fake.status == "running" and rig.replica.problem == ""
    copies = await rig.copies()
    assert {h: c.state for h, c in copies.copies.items()} == {"h1": CopyState.CURRENT, "h2": CopyState.CURRENT}
    assert "x-blockdev-change" not in rig.fake.commands()  # (nothing was dropped from the graph)


async def test_without_ownership_the_failed_io_is_never_retried(rig: Rig) -> None:
    rig.replica.io_retry_first_s = 0.05
    assert await rig.store.release("db", rig.token)  # another host may own it now
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-local1", "type": "write"})
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-remote2", "type": "write"})
    await until("the retry refused", lambda: _true(any(k == "replica" and "no longer owns" in m
                                                       for k, m in rig.journal.seen)))
    assert "cont" not in rig.fake.commands() and rig.fake.status == "io-error"


async def test_without_ownership_a_failed_copy_never_continues_the_guest(rig: Rig) -> None:
    assert await rig.store.release("db", rig.token)  # another host may own it now
    rig.fake.emit("QUORUM_REPORT_BAD", {"node-name": "d0-remote2", "type": "write"})
    await until("the step fails", lambda: _true(any(k == "replica" for k, _ in rig.journal.seen)))
    assert "cont" not in rig.fake.commands() and "x-blockdev-change" not in rig.fake.commands()
    assert rig.fake.status == "io-error"


async def _true(value: bool) -> bool:
    return value
