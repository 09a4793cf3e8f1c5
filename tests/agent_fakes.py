"""What the agent's rooms need from the agent, for tests that drive a room alone: a
journal that records events, a host context on a real store under a given lease, and a
level 2 VM owned on that store with the fake QEMU as its QEMU."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from fake_qemu import FakeQemu
from ftvm.agent.context import HostContext
from ftvm.agent.replica import ReplicaManager
from ftvm.core.model import DiskSpec, HostInfo, Level, NicSpec, PoolSnapshot, VmSpec
from ftvm.core.replication import Copies, Copy, CopyState
from ftvm.core.timing import Timing
from ftvm.qemu.blockgraph import DiskGraph, LocalImage
from ftvm.store.etcd import EtcdClient
from ftvm.store.pool import PoolStore


@dataclass
class Journal:
    seen: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)

    def event(self, vm: str, kind: str, message: str, at: float | None = None) -> None:
        self.seen.append((kind, message))


def host_context(me: str, store: PoolStore, lease: int, journal: Journal,
                 latest: Callable[[], PoolSnapshot | None]) -> HostContext:
    """`me` holding `lease` (no renewal: the test's lease outlives it)."""
    return HostContext(me, store, SimpleNamespace(id=lease), journal,  # type: ignore[arg-type]
                       latest, lambda: None, Timing())


LEVEL2_SPEC = VmSpec("db", Level.COMPONENT, 256, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:02"),))
REPLICA_COMMANDS = ("blockdev-add", "blockdev-del", "blockdev-reopen", "x-blockdev-change", "block-dirty-bitmap-add",
                    "block-job-cancel")


@dataclass
class Level2Rig:
    """VM "db" at level 2, owned by h1 under `token` on a real store, h2 its partner; its
    QEMU the fake one. `make` builds its replica manager over a graph."""

    store: PoolStore
    fake: FakeQemu
    journal: Journal
    token: int
    make: Callable[[DiskGraph], ReplicaManager]
    made: list[ReplicaManager]

    @property
    def replica(self) -> ReplicaManager:
        return self.made[-1]

    async def copies(self) -> Copies:
        got = await self.store.get_copies("db")
        assert got is not None
        return got

    async def copy_on(self, host: str) -> Copy:
        copy = (await self.copies()).state_of(host)
        assert copy is not None
        return copy


@asynccontextmanager
async def level2_rig(etcd_url: str, tmp_path: Path, pool: str, partner: CopyState,
                     status: str = "running") -> AsyncIterator[Level2Rig]:
    """The partner's copy recorded `partner`; the QEMU's status `status` (io-error: a failed
    write stopped the guest). The replica managers made are stopped at the end."""
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        store = PoolStore(client, pool)
        lease, _ = await client.lease_grant(30)
        assert await store.register_host(HostInfo("h1", 1024, 2, ()), lease)
        assert await store.define_vm(LEVEL2_SPEC)
        copies = Copies(1, {"h1": Copy(CopyState.CURRENT, 0.0, "in sync"), "h2": Copy(partner, 0.0, "set up")})
        token = await store.claim("db", "h1", lease, None, copies)
        assert token is not None
        snapshot: list[PoolSnapshot] = [await store.snapshot()]
        journal = Journal()
        host = host_context("h1", store, lease, journal, lambda: snapshot[0])
        fake = FakeQemu(tmp_path / "run")
        fake.status = status
        fake.on("query-blockstats", lambda args: [])
        for cmd in REPLICA_COMMANDS:
            fake.on(cmd, lambda args: {})
        made: list[ReplicaManager] = []
        qemu = await fake.start_vm(LEVEL2_SPEC, on_event=lambda name, data: made[-1].on_qemu_event(name, data))

        def make(graph: DiskGraph) -> ReplicaManager:
            made.append(ReplicaManager(host.for_vm("db", token), qemu,
                                       [LocalImage(str(tmp_path / "d0.raw"), "raw")], [graph]))
            return made[-1]
        try:
            yield Level2Rig(store, fake, journal, token, make, made)
        finally:
            for replica in made:
                replica.stop()
            await fake.close()
