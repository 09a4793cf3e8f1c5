"""The host lease outlives its agent (agent/lease.py), against a real etcd: a new agent
renews its predecessor's lease while etcd still holds it, so the VMs the keepers kept
stay owned; once etcd has dropped it, the new agent takes a new lease, and the deadline
file the keepers read names the new lease (so every keeper of the old one fences). One
agent per state directory."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from ftvm.agent.agent import Agent
from ftvm.agent.config import AgentConfig
from ftvm.agent.lease import AgentStartError
from ftvm.qemu.keeper import may_run, read_deadline

_pools = itertools.count()


def _config(etcd_url: str, state: Path, pool: str) -> AgentConfig:
    return AgentConfig("h1", pool, (etcd_url,), state, "br-none", 2048, 2, ())


async def test_a_new_agent_keeps_the_lease_etcd_still_holds(etcd_url: str, tmp_path: Path) -> None:
    pool = f"kept{next(_pools)}"
    first = Agent(_config(etcd_url, tmp_path, pool))
    await first.host_lease.join()
    assert not first.host_lease.resumed
    lease = first.lease
    await first.etcd.close()  # the first agent dies: no revoke, no more renewals
    second = Agent(_config(etcd_url, tmp_path, pool))
    try:
        await second.host_lease.join()
        assert second.host_lease.resumed and second.lease == lease
        assert read_deadline(tmp_path / "fence-deadline") is not None
        assert may_run(tmp_path / "fence-deadline", lease)  # the keepers of lease L go on
        snap = await second.store.snapshot()
        assert snap.hosts["h1"].lease_id == lease
    finally:
        await second.host_lease.revoke()
        await second.etcd.close()


async def test_an_agent_leaving_renews_once_more_so_the_next_has_the_whole_lease(etcd_url: str,
                                                                                  tmp_path: Path) -> None:
    pool = f"kept{next(_pools)}"
    agent = Agent(_config(etcd_url, tmp_path, pool))
    try:
        await agent.host_lease.join()
        first = read_deadline(tmp_path / "fence-deadline")
        assert first is not None
        await asyncio.sleep(0.2)
        await agent.host_lease.renew_for_successor()
        last = read_deadline(tmp_path / "fence-deadline")
        assert last is not None and last[0] == agent.lease and last[1] >= first[1] + 0.2
    finally:
        await agent.host_lease.revoke()
        await agent.etcd.close()


async def test_a_lease_etcd_dropped_is_not_kept_and_its_keepers_fence(etcd_url: str, tmp_path: Path) -> None:
    pool = f"kept{next(_pools)}"
    first = Agent(_config(etcd_url, tmp_path, pool))
    await first.host_lease.join()
    old = first.lease
    await first.host_lease.revoke()  # (as when etcd expires it)
    await first.etcd.close()
    second = Agent(_config(etcd_url, tmp_path, pool))
    try:
        await second.host_lease.join()
        assert not second.host_lease.resumed and second.lease != old
        assert not may_run(tmp_path / "fence-deadline", old)  # every keeper of the old lease kills
        assert may_run(tmp_path / "fence-deadline", second.lease)
    finally:
        await second.host_lease.revoke()
        await second.etcd.close()


async def test_one_agent_per_state_directory(etcd_url: str, tmp_path: Path) -> None:
    first = Agent(_config(etcd_url, tmp_path, "lock"))
    second = Agent(_config(etcd_url, tmp_path, "lock"))
    first._hold_state_dir()
    try:
        with pytest.raises(AgentStartError, match="another agent runs with state directory"):
            second._hold_state_dir()
    finally:
        first._state_lock.close()
    second._hold_state_dir()  # the first one's lock went with it
    second._state_lock.close()
    await asyncio.gather(first.etcd.close(), second.etcd.close())
