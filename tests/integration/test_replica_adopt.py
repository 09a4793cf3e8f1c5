"""A new agent takes over a level 2 VM's replica from the agent that died (agent/replica.py
`ReplicaManager.adopt`), against the fake QEMU and a real etcd: whatever the old agent
left half done is settled the safe way before the guest writes on, and the store says so
first."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent_fakes import Level2Rig as Rig, level2_rig
from ftvm.agent.replica import BITMAP
from ftvm.core.replication import CopyState
from ftvm.qemu.blockgraph import DiskGraph, Mode

_pools = itertools.count()
LOCAL_ONLY = DiskGraph(0, Mode.LOCAL_ONLY, 5, "d0-local4", None, None)
MIRRORED = DiskGraph(0, Mode.MIRRORED, 3, "d0-local1", "d0-remote2", "d0-q2")


@pytest.fixture
async def rig(etcd_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with level2_rig(etcd_url, tmp_path, f"adopt{next(_pools)}", CopyState.OUTDATED) as rig:
        yield rig


def _nodes(*bitmaps: tuple[str, str]) -> Callable[[dict[str, Any]], Any]:
    names = ("disk0", "d0-local4", "d0-remote7")
    return lambda args: [{"node-name": n, "dirty-bitmaps": [{"name": b} for node, b in bitmaps if node == n]}
                         for n in names]


async def test_a_resync_cut_short_is_cancelled_and_the_partner_resynced_in_full(rig: Rig) -> None:
    jobs = [{"device": "resync-d0", "type": "backup"}]
    rig.fake.on("query-block-jobs", lambda args: list(jobs))
    rig.fake.on("block-job-cancel", lambda args: jobs.clear() or {})
    rig.fake.on("query-named-block-nodes", _nodes(("d0-local4", BITMAP)))
    replica = rig.make(LOCAL_ONLY)
    await replica.adopt("running")
    h2 = await rig.copy_on("h2")
    assert h2.state is CopyState.OUTDATED and h2.full and "cut short by an agent restart" in h2.reason
    calls = rig.fake.calls
    assert ("block-job-cancel", {"device": "resync-d0", "force": True}) in calls
    assert ("blockdev-del", {"node-name": "d0-remote7"}) in calls  # the job's spare node
    assert "cont" not in rig.fake.commands()  # (it was running)


async def test_a_local_copy_without_its_bitmap_gets_one_and_the_partner_a_full_resync(rig: Rig) -> None:
    """The old agent died between dropping the partner and adding the bitmap: the writes since
    were tracked by nobody."""
    rig.fake.on("query-block-jobs", lambda args: [])
    rig.fake.on("query-named-block-nodes", _nodes())
    rig.fake.status = "paused"  # (it stops the guest for the drop)
    replica = rig.make(LOCAL_ONLY)
    await replica.adopt("paused")
    h2 = await rig.copy_on("h2")
    assert h2.state is CopyState.OUTDATED and h2.full and "not tracked" in h2.reason
    commands = rig.fake.commands()
    assert commands.index("block-dirty-bitmap-add") < commands.index("cont")  # tracked before the guest runs
    assert rig.fake.status == "running"


async def test_a_paused_mirror_whose_partner_is_recorded_behind_finishes_the_drop(rig: Rig) -> None:
    """The old agent recorded the partner outdated, then died before dropping it: the new one
    drops it before the guest writes again (no continue on a graph the record does not
    describe: the partner would get writes while recorded behind, and a resync would skip
    them)."""
    rig.fake.on("query-block-jobs", lambda args: [])
    rig.fake.on("query-named-block-nodes", _nodes())
    rig.fake.status = "paused"
    replica = rig.make(MIRRORED)
    await replica.adopt("paused")
    for _ in range(500):
        if rig.fake.status == "running":
            break
        await asyncio.sleep(0.01)
    commands = rig.fake.commands()
    assert commands.index("x-blockdev-change") < commands.index("cont")  # dropped, then continued
    assert replica.graphs[0].mode is Mode.LOCAL_ONLY


async def test_a_guest_stopped_on_an_io_error_is_continued_once_to_name_the_failed_copy(rig: Rig) -> None:
    rig.fake.on("query-block-jobs", lambda args: [])
    rig.fake.on("query-named-block-nodes", _nodes())
    rig.fake.status = "io-error"
    replica = rig.make(MIRRORED)
    await replica.adopt("io-error")
    assert rig.fake.commands().count("cont") == 1
    assert (await rig.copy_on("h2")).state is CopyState.OUTDATED and not (await rig.copy_on("h2")).full  # (unchanged)
