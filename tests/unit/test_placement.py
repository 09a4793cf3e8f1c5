"""Partner placement in 3-4 host pools (pure)."""

from __future__ import annotations

from dataclasses import replace

from ftvm.core.model import DiskSpec, HostInfo, Level, NicSpec, Ownership, PoolSnapshot, VmSpec, VmView
from ftvm.core.placement import choose_partner, failover_reserve, partner_with_room, raise_to_system_problem
from ftvm.core.replication import CopyState, mark, new_copies


def spec(name: str, mem: int = 512) -> VmSpec:
    return VmSpec(name, Level.COMPONENT, mem, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:01"),))


def hosts(*names: str, mem: int = 2048) -> dict[str, HostInfo]:
    return {n: HostInfo(n, mem, 8, replication_addr=f"10.79.0.{i}") for i, n in enumerate(names, 1)}


def running(name: str, host: str, partner: str, mem: int = 512) -> VmView:
    copies = mark(new_copies(host, partner, 1.0), partner, CopyState.CURRENT, "in sync", 2.0)
    return VmView(spec(name, mem), Ownership(host, 1), copies=copies)


def test_partners_are_spread_over_the_other_hosts() -> None:
    snap = PoolSnapshot(1, hosts("h1", "h2", "h3", "h4"), {"a": running("a", "h1", "h2")})
    # h2 already keeps a copy for h1's VM: the next goes elsewhere
    assert choose_partner(snap, spec("b"), "h1") in ("h3", "h4")
    snap2 = PoolSnapshot(1, snap.hosts, {"a": running("a", "h1", "h2"), "b": running("b", "h1", "h3")})
    assert choose_partner(snap2, spec("c"), "h1") == "h4"


def test_partner_needs_room_for_what_it_would_take_over() -> None:
    """h2 has room for one 1 GiB VM: it already backs one of h1's; a second goes to h3
    even though h2 has more free memory now."""
    hs = hosts("h1", "h2", "h3")
    hs["h2"] = HostInfo("h2", 1536, 8, replication_addr="10.79.0.2")
    snap = PoolSnapshot(1, hs, {"a": running("a", "h1", "h2", mem=1024)})
    assert failover_reserve(snap, "h2", "h1") == (1024, 1)
    assert choose_partner(snap, spec("b", 1024), "h1") == "h3"


def test_no_room_anywhere_is_refused_with_the_reason() -> None:
    snap = PoolSnapshot(1, hosts("h1", "h2", mem=1024), {"a": running("a", "h1", "h2", mem=768)})
    partner, why = partner_with_room(snap, spec("b", 512), "h1")
    assert partner is None and "no partner has room" in why and "h2" in why
    alone = PoolSnapshot(1, hosts("h1"), {})
    assert partner_with_room(alone, spec("b"), "h1")[0] is None


def test_hosts_in_maintenance_are_never_partners() -> None:
    snap = PoolSnapshot(1, hosts("h1", "h2", "h3"), {}, maintenance=frozenset({"h2"}))
    assert choose_partner(snap, spec("b"), "h1") == "h3"


def test_overcommit_is_refused_with_what_is_free() -> None:
    from dataclasses import replace

    from ftvm.core.model import Desired
    from ftvm.core.placement import overcommit_problem
    snap = PoolSnapshot(1, hosts("h1", "h2", mem=1024), {"a": running("a", "h1", "h2", mem=768)})
    problem = overcommit_problem(snap, replace(spec("big", 2048), level=Level.RESTART))
    assert problem is not None and problem.startswith("overcommit") and "h1 256 MiB" in problem
    # fits on h2 by memory, but nobody could take a level 2 VM over: unprotected, refused
    problem = overcommit_problem(snap, spec("b", 512))
    assert problem is not None and "no partner has room" in problem
    assert overcommit_problem(snap, replace(spec("c", 200), level=Level.RESTART)) is None
    # VMs already waiting for room count
    waiting = VmView(replace(spec("w", 1100), level=Level.RESTART, desired=Desired.RUNNING))
    snap2 = PoolSnapshot(1, snap.hosts, {**snap.vms, "w": waiting})
    problem = overcommit_problem(snap2, replace(spec("c", 200), level=Level.RESTART))
    assert problem is not None and "1 VM(s) already waiting" in problem


def test_a_partner_down_too_long_is_replaced_on_another_host() -> None:
    from dataclasses import replace

    from ftvm.core.decide import Action, decide
    from ftvm.core.model import Desired, LocalView, LocalVm, RunState
    from ftvm.core.replication import take_over
    copies = take_over(mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "in sync", 2.0), "h2", 100.0)
    view = VmView(replace(spec("a"), desired=Desired.RUNNING), Ownership("h2", 7), copies=copies, home="h2")
    snap = PoolSnapshot(1, hosts("h2", "h3"), {"a": view})  # h1 (the old primary, now partner) is down
    local = {"a": LocalVm("a", RunState.RUNNING, 7)}

    def action(now: float, s: PoolSnapshot = snap) -> tuple[Action, str | None]:
        d = decide(s, LocalView("h2", local, now=now), replace_partner_after=30.0).decisions[0]
        return d.action, d.target

    assert action(120.0) == (Action.WAIT, None)           # down 20 s: it may come back
    assert action(131.0) == (Action.REPLACE_PARTNER, "h3")
    back = PoolSnapshot(1, hosts("h1", "h2", "h3"), {"a": view})
    assert action(131.0, back)[0] is Action.WAIT           # it came back: resynced, not replaced
    alone = PoolSnapshot(1, hosts("h2"), {"a": view})
    assert action(131.0, alone)[0] is Action.WAIT          # nowhere to build one


def test_failback_asks_a_migration_home_only_when_the_home_can_run_it() -> None:
    from dataclasses import replace

    from ftvm.core.decide import Action, decide
    from ftvm.core.model import Desired, LocalView, LocalVm, RunState, VmStatus
    base = replace(spec("a"), level=Level.RESTART, disks=(DiskSpec("/shared/a.img"),), desired=Desired.RUNNING,
                   preferred_host="h1", failback=True)
    hs = {n: HostInfo(n, 2048, 8, ("/shared",), replication_addr=f"10.79.0.{i}") for i, n in enumerate(("h1", "h2"), 1)}
    view = VmView(base, Ownership("h2", 4), VmStatus("h2", RunState.RUNNING, 4, 1.0), home="h2")
    local = LocalView("h2", {"a": LocalVm("a", RunState.RUNNING, 4)}, now=100.0)

    def act(snap: PoolSnapshot) -> tuple[Action, str | None]:
        d = decide(snap, local).decisions[0]
        return d.action, d.target

    assert act(PoolSnapshot(1, hs, {"a": view})) == (Action.FAILBACK, "h1")
    assert act(PoolSnapshot(1, hs, {"a": view}, maintenance=frozenset({"h1"})))[0] is Action.WAIT
    assert act(PoolSnapshot(1, {"h2": hs["h2"]}, {"a": view}))[0] is Action.WAIT  # home down
    off = replace(view, spec=replace(base, failback=False))
    assert act(PoolSnapshot(1, hs, {"a": off}))[0] is Action.WAIT


def test_raising_to_level3_needs_room_for_the_guests_ram_twice() -> None:
    """The raise moves the VM into a second QEMU on the same host: for a moment the host
    holds the guest's RAM twice, so it needs the VM's memory free on top of its use."""
    hs = hosts("h1", "h2", mem=2048)
    snap = PoolSnapshot(1, hs, {"a": running("a", "h1", "h2", mem=1024), "b": running("b", "h1", "h2", mem=512)})
    assert raise_to_system_problem(snap, spec("b", 512), "h1") is None  # 1536 used, 512 free
    snap2 = PoolSnapshot(1, hs, {"a": running("a", "h1", "h2", mem=1024), "b": running("b", "h1", "h2", mem=768)})
    problem = raise_to_system_problem(snap2, spec("b", 768), "h1")
    assert problem and "768 MiB more needed, h1 has 256 MiB free" in problem
    assert "not a live host" in (raise_to_system_problem(snap, spec("b"), "h9") or "")


def l3(name: str, host: str, partner: str, mem: int) -> VmView:
    from dataclasses import replace
    view = running(name, host, partner, mem)
    return replace(view, spec=replace(view.spec, level=Level.SYSTEM))


def test_a_level3_partner_counts_the_ram_replica_it_keeps() -> None:
    """A level 3 partner keeps the guest's RAM in a tmpfs file: memory it really uses, so
    nothing else may be placed in it; the VM itself, moving or failing over there, finds
    that memory already its own (counted once)."""
    from ftvm.core.decide import eligible_hosts
    from ftvm.core.model import CheckpointFigures, RunState, VmStatus
    from ftvm.core.placement import migration_problem, overcommit_problem
    hs = hosts("h1", "h2", mem=1024)
    x = replace(l3("x", "h1", "h2", 768), status=VmStatus("h1", RunState.RUNNING, 1, 1.0),
                checkpoints=CheckpointFigures("h2", "protected"))
    snap = PoolSnapshot(1, hs, {"x": x})
    assert snap.replica_memory("h2") == 768 and snap.used_memory("h2") == 768
    assert snap.used_memory("h2", exclude="x") == 0 and snap.replica_memory("h1") == 0
    assert not snap.has_room("h2", spec("y", 512))  # 768 of h2's 1024 MiB hold x's replica
    assert failover_reserve(snap, "h2", "h1") == (0, 1)  # x's memory is held already, not reserved again
    problem = overcommit_problem(snap, replace(spec("y", 512), level=Level.RESTART))
    assert problem and "no live host has that free" in problem  # h1 runs x, h2 holds its replica
    # x itself may switch over to h2, or fail over there: its replica becomes its RAM
    assert snap.has_room("h2", x.spec) and migration_problem(snap, x, "h2") is None
    lost = PoolSnapshot(2, {"h2": hs["h2"]}, {"x": replace(x, owner=None, status=None)})
    assert eligible_hosts(lost, lost.vms["x"]) == ["h2"]
    # level 2 copies are disks only: no memory held on the partner, the failover reserve counts it
    snap2 = PoolSnapshot(1, hs, {"x": running("x", "h1", "h2", 768)})
    assert snap2.used_memory("h2") == 0 and failover_reserve(snap2, "h2", "h1") == (768, 1)


def test_evacuation_plan_places_each_vm_counting_what_it_already_placed() -> None:
    """Maintenance of h1: every VM it runs goes live to the host with most room left, room
    counted as the plan fills hosts; a VM that fits nowhere is named with the reason."""
    from ftvm.core.model import (DiskSpec, HostInfo, Level, NicSpec, Ownership, PoolSnapshot, RunState, VmSpec,
                                 VmStatus, VmView)
    from ftvm.core.placement import plan_evacuation
    shared = "/srv/shared"

    def vm(name: str, mib: int) -> VmView:
        spec = VmSpec(name, Level.RESTART, mib, 1, (DiskSpec(f"{shared}/{name}.img"),), (NicSpec("52:54:00:00:00:01"),))
        return VmView(spec, owner=Ownership("h1", 3), home="h1", status=VmStatus("h1", RunState.RUNNING, 3, 1.0))
    hosts = {h: HostInfo(h, mib, 8, (shared,), replication_addr=f"10.79.0.{i}")
             for i, (h, mib) in enumerate((("h1", 4096), ("h2", 1024), ("h3", 1536)), 1)}
    snap = PoolSnapshot(1, hosts, {"a": vm("a", 1024), "b": vm("b", 768), "c": vm("c", 1024)})
    planned, problems = plan_evacuation(snap, "h1")
    assert planned == {"a": "h3", "b": "h2"}  # a takes h3 (most room), then b fits only on h2
    assert len(problems) == 1 and problems[0].startswith("c: ")
    assert plan_evacuation(PoolSnapshot(1, hosts, {"a": vm("a", 256)}), "h2") == ({}, [])  # runs nothing there
