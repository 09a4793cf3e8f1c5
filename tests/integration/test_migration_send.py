"""The source side of a live migration (agent/migration.py, `send`), against the fake
QEMU and a real etcd: a move that completes is handed over in one transaction; one that
fails, or whose target vanished, leaves the guest running here with the request gone."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_fakes import Journal, host_context
from fake_qemu import FakeQemu
from ftvm.agent import migration
from ftvm.agent.context import VmContext
from ftvm.core.model import DiskSpec, HostInfo, Incoming, Level, Migration, NicSpec, PoolSnapshot, VmSpec
from ftvm.qemu.process import QemuVm
from ftvm.store.etcd import EtcdClient
from ftvm.store.pool import PoolStore

_pools = itertools.count()
SPEC = VmSpec("app", Level.RESTART, 256, 1, (DiskSpec("/s/app.img"),), (NicSpec("52:54:00:00:00:03"),))


@dataclass
class Move:
    store: PoolStore
    fake: FakeQemu
    qemu: QemuVm
    ctx: VmContext
    journal: Journal
    request: Migration
    incoming: Incoming
    target_lease: int


@pytest.fixture
async def move(etcd_url: str, tmp_path: Path) -> AsyncIterator[Move]:
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        store = PoolStore(client, f"mig{next(_pools)}")
        leases = {}
        for h in ("h1", "h2"):
            leases[h], _ = await client.lease_grant(30)
            assert await store.register_host(HostInfo(h, 1024, 2, ("/s",)), leases[h])
        assert await store.define_vm(SPEC)
        token = await store.claim("app", "h1", leases["h1"])
        assert token is not None
        request = Migration(to="h2", source="h1", token=token, started=time.time())
        assert await store.request_migration("app", token, request, leases["h1"])
        incoming = Incoming("h2", "127.0.0.1", 1)  # never dialled: the fake QEMU answers `migrate`
        assert await store.publish_incoming("app", incoming, leases["h2"])
        snapshot: list[PoolSnapshot] = [await store.snapshot()]
        journal = Journal()
        host = host_context("h1", store, leases["h1"], journal, lambda: snapshot[0])
        fake = FakeQemu(tmp_path / "run")
        qemu = await fake.start_vm(SPEC)
        try:
            yield Move(store, fake, qemu, host.for_vm("app", token), journal, request, incoming, leases["h2"])
        finally:
            await fake.close()


async def test_a_completed_migration_is_handed_over_to_the_target(move: Move) -> None:
    move.fake.migrate_states = ["active", "active", "completed"]
    assert await migration.send(move.ctx, move.qemu, move.request, move.incoming)
    view = (await move.store.snapshot()).vms["app"]
    assert view.owner is None and view.handover_host == "h2" and view.migration is None
    assert "cont" not in move.fake.commands()  # paused here: the caller kills this copy
    assert any(k == "migrate" and "handed over" in m for k, m in move.journal.seen)


async def test_a_failed_migration_leaves_the_guest_running_here(move: Move) -> None:
    move.fake.migrate_states = ["active", "failed"]
    move.fake.migrate_error = "Unable to write to socket: Connection reset by peer"
    assert not await migration.send(move.ctx, move.qemu, move.request, move.incoming, stopped_copy=True)
    commands = move.fake.commands()
    assert commands[0] == "stop" and commands[-1] == "cont"  # stopped for the copy, continued after
    view = (await move.store.snapshot()).vms["app"]
    assert view.owner is not None and view.owner.host == "h1" and view.migration is None
    assert any(k == "migrate" and "Connection reset by peer" in m and "stays here" in m for k, m in move.journal.seen)


async def test_a_target_gone_before_the_handover_keeps_the_vm_here(move: Move) -> None:
    await move.store.etcd.lease_revoke(move.target_lease)  # h2 dies: its incoming record goes with it
    assert not await migration.send(move.ctx, move.qemu, move.request, move.incoming)
    view = (await move.store.snapshot()).vms["app"]
    assert view.owner is not None and view.owner.host == "h1" and view.handover_host is None
    assert move.fake.commands()[-1] == "cont"  # postmigrate would leave it paused: continued
