"""Live migration and host maintenance in a lab pool: one client connection stays open,
nothing acknowledged is lost, the VM ends on the target, and the host stays empty."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import Level
from ftvm.errors import FtvmError
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, sequence_breaks
from ftvm.views import runs_on

pytestmark = pytest.mark.lab


def _run(pool: LabPool, fn):  # an ops call against the lab's store
    return pool.run(fn)


def _wait_on(pool: LabPool, vm: str, host: str, timeout: float) -> None:
    pool.wait_for(f"{vm} running on {host}", lambda s: runs_on(s, vm, host), timeout)


def test_live_migration_keeps_the_connection_and_every_record(lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("mig", 50, Level.RESTART, guest_image, host="h1")
    ip = topo.vm_addr(50).split("/")[0]
    client = None
    try:
        pool.wait_running("mig", 60)
        pool.wait_answering(ip, 60)
        client = LabClient(lab, ip, "mig", 0.01, reply_timeout=60)
        client.wait_acks(50, 30)
        for target in ("h2", "h1"):  # the pause each move costs is a figure: `ftvm bench`, the demo
            _run(pool, lambda s, t=target: ops.migrate(s, "mig", t))
            _wait_on(pool, "mig", target, 60)
            client.wait_acks(30, 30, after=time.time())
        acks = client.stop()
        assert [e.get("kind") for e in client.other_events()] == ["connect"], client.other_events()
        assert sequence_breaks(acks) == (0, 0)
        assert check_acked_on_disk(Path(spec.disks[0].path), acks)[1] == []
        events = [e for e in pool.events() if e.vm == "mig"]
        assert sum(1 for e in events if e.kind == "migrate" and "handed over" in e.message) == 2
        # refusals change nothing
        with pytest.raises(FtvmError, match="already runs on"):
            _run(pool, lambda s: ops.migrate(s, "mig", "h1"))
        with pytest.raises(FtvmError, match="not a live host"):
            _run(pool, lambda s: ops.migrate(s, "mig", "h9"))
    finally:
        if client is not None:
            client.stop()
        pool.stop_and_remove("mig")


def test_maintenance_empties_the_host_and_nothing_is_placed_there(lab: labmod.LabState, guest_image) -> None:
    """Maintenance moves a level 1 VM and a level 2 VM (to its partner, replication kept);
    nothing new is placed on the host while it lasts."""
    from ftvm.core.replication import CopyState
    from ftvm.lab.scenario import copy_is
    pool = LabPool(lab)
    pool.define_ledger_vm("mnt", 51, Level.RESTART, guest_image, host="h1")
    pool.define_ledger_vm("mnt2", 52, Level.COMPONENT, guest_image, host="h1")
    try:
        pool.wait_running("mnt", 60)
        pool.wait_answering(topo.vm_addr(51).split("/")[0], 60)
        pool.wait_running("mnt2", 60)
        pool.wait_for("mnt2 mirrored", copy_is("mnt2", "h2", CopyState.CURRENT), 60)
        moves = _run(pool, lambda s: ops.start_maintenance(s, "h1", "test"))
        assert moves == {"mnt": "h2", "mnt2": "h2"}
        _wait_on(pool, "mnt", "h2", 60)
        _wait_on(pool, "mnt2", "h2", 60)
        # h1 still serves its copy: the level 2 VM is mirrored again, h1's copy the replica
        pool.wait_for("mnt2 mirrored to h1", copy_is("mnt2", "h1", CopyState.CURRENT), 60)
        snap = pool.snapshot()
        assert snap.maintenance == frozenset({"h1"})
        # a VM started now is not placed on h1, although it prefers it
        pool.define_ledger_vm("mnt3", 53, Level.RESTART, guest_image, host="h1")
        assert pool.wait_running("mnt3", 60) == "h2"
        # failback policy: on for mnt2 only. Resumed, h1 gets mnt2 back (live, replication kept);
        # mnt stays on h2
        _run(pool, lambda s: ops.set_failback(s, "mnt2", True))
        pool.wait_ticks(["h1", "h2"])
        assert runs_on(pool.snapshot(), "mnt2", "h2")  # nothing moves while h1 is in maintenance
        _run(pool, lambda s: ops.end_maintenance(s, "h1"))
        assert pool.snapshot().maintenance == frozenset()
        _wait_on(pool, "mnt2", "h1", 60)
        pool.wait_for("mnt2 mirrored to h2", copy_is("mnt2", "h2", CopyState.CURRENT), 60)
        assert runs_on(pool.snapshot(), "mnt", "h2")
        assert any(e.kind == "failback" for e in pool.events() if e.vm == "mnt2")
        pool.stop_and_remove("mnt3")
    finally:
        pool.stop_and_remove("mnt2")
        pool.stop_and_remove("mnt")
        _run(pool, lambda s: s.set_maintenance("h1", False))


def test_rolling_upgrade_keeps_every_vm_answering(lab: labmod.LabState, guest_image) -> None:
    """Maintenance h1, restart h1's agent, resume h1; then the same for h2: VMs of levels 1, 2
    and 3 keep answering their clients on one connection each, nothing acknowledged is lost.
    Before each maintenance the operator waits until every VM is protected (a level 2/3 VM
    moves only to a current copy)."""
    from ftvm.core.protection import protection
    pool = LabPool(lab)
    levels = (Level.RESTART, Level.RESTART, Level.COMPONENT, Level.SYSTEM)
    specs = [pool.define_ledger_vm(f"ru{i}", 54 + i, level, guest_image, host=("h1", "h2")[i % 2])
             for i, level in enumerate(levels)]
    clients = []

    def all_protected(snap) -> bool:
        return all(snap.vms[s.name].owner is not None and protection(snap, snap.vms[s.name]).protected
                   for s in specs)
    try:
        for i, s in enumerate(specs):
            pool.wait_running(s.name, 60)
            pool.wait_answering(topo.vm_addr(54 + i).split("/")[0], 60)
        clients = [LabClient(lab, topo.vm_addr(54 + i).split("/")[0], s.name, 0.02, reply_timeout=60)
                   for i, s in enumerate(specs)]
        for c in clients:
            c.wait_acks(20, 30)
        for host in ("h1", "h2"):
            pool.wait_for("every VM protected", all_protected, 120)
            moves = pool.run(lambda s, h=host: ops.start_maintenance(s, h, "upgrade"))
            for vm, to in moves.items():
                _wait_on(pool, vm, to, 60)
            assert not any(v.owner and v.owner.host == host for v in pool.snapshot().vms.values())
            labmod.restart_agent(lab, host)
            pool.run(lambda s, h=host: ops.end_maintenance(s, h))
            for c in clients:  # every VM still answers after each step
                c.wait_acks(10, 30, after=time.time())
        for s, c in zip(specs, clients, strict=True):
            acks = c.stop()
            assert [e.get("kind") for e in c.other_events()] == ["connect"], s.name
            assert sequence_breaks(acks) == (0, 0)
            host = pool.snapshot().vms[s.name].owner.host  # type: ignore[union-attr]
            disk = (Path(s.disks[0].path) if not s.level.has_copies
                    else pool.copy_as_raw(s.name, host, Path(lab.dir) / f"{s.name}.raw"))
            assert check_acked_on_disk(disk, acks)[1] == [], s.name
    finally:
        for c in clients:
            c.stop()
        for s in specs:
            pool.stop_and_remove(s.name)
