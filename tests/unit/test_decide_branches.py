"""Every branch of `decide` for one VM (core/decide.py, `_decide_vm`), as a table: the pool
as the snapshot says, what this host runs, and the one decision that must come out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from ftvm.core.decide import Action, decide
from ftvm.core.model import (Desired, DiskSpec, HostInfo, Incoming, Level, LevelChange, LocalView, LocalVm,
                             Migration, NicSpec, Ownership, PoolSnapshot, RunState, VmSpec, VmStatus, VmView)
from ftvm.core.guest_failures import PANIC, GuestRecord
from ftvm.core.replication import CopyState, mark, new_copies

SHARED = "/srv/shared"
HOSTS = {h: HostInfo(h, 4096, 4, (SHARED,), replication_addr=f"10.79.0.{i}") for i, h in enumerate(("h1", "h2"), 1)}
SPEC = VmSpec("web", Level.RESTART, 256, 1, (DiskSpec(f"{SHARED}/web.img"),), (NicSpec("52:54:00:00:00:01"),),
              desired=Desired.RUNNING, preferred_host="h1")
OWNED = Ownership("h1", 7)
MIGRATION = Migration(to="h2", source="h1", token=7, started=1.0)
INCOMING = Incoming("h2", "10.79.0.2", 4444)


def running(token: int = 7, state: RunState = RunState.RUNNING) -> dict[str, LocalVm]:
    return {"web": LocalVm("web", state, token)}


GAVE_UP = GuestRecord((), "guest failed 4 times in 1 h (last: guest kernel panic on h1)")
L2_COPIES = mark(new_copies("h1", "h2", 0.0), "h2", CopyState.OUTDATED, "h2 down", 1.0)

CASES: list[tuple[str, str, dict[str, Any], dict[str, LocalVm], Action, str]] = [
    # (case, this host, VmView fields, what this host runs, decision, in its reason)
    # --- nobody owns it
    ("unowned, running here after a handover", "h1", dict(owner=None, handover_host="h2"), running(),
     Action.KILL, "handed the VM over to h2"),
    ("unowned, running here: lease lost", "h1", dict(owner=None), running(), Action.KILL, "without ownership"),
    ("handed over to this host", "h2", dict(owner=None, handover_host="h2"), {}, Action.CLAIM, "handed the VM over"),
    ("target of a migration that went elsewhere", "h1",
     dict(owner=None, handover_host="h2"), running(0, RunState.INCOMING), Action.KILL, "the migration went to h2"),
    ("another host takes it over after a handover", "h1", dict(owner=None, handover_host="h2"), {},
     Action.WAIT, "migrated to h2"),
    ("a waiting migration target with no handover", "h2", dict(owner=None), running(0, RunState.INCOMING),
     Action.KILL, "migration abandoned"),
    ("unowned and stopped", "h1", dict(owner=None, spec=replace(SPEC, desired=Desired.STOPPED)), {},
     Action.WAIT, "stopped"),
    ("unowned, this host chosen", "h1", dict(owner=None), {}, Action.CLAIM, "home host h1"),
    ("unowned, another host chosen", "h2", dict(owner=None), {}, Action.WAIT, "h1"),
    # --- another host owns it
    ("owned elsewhere, running here", "h2", dict(), running(7), Action.KILL, "never two copies"),
    ("receiving its live migration", "h2", dict(migration=MIGRATION, incoming=INCOMING),
     running(0, RunState.INCOMING), Action.WAIT, "receiving the live migration"),
    ("a migration target no longer asked for", "h2", dict(), running(0, RunState.INCOMING), Action.KILL,
     "migration abandoned"),
    ("asked to receive a live migration", "h2", dict(migration=MIGRATION), {}, Action.PREPARE_INCOMING,
     "preparing to receive"),
    ("owned elsewhere", "h2", dict(), {}, Action.WAIT, "runs on h1"),
    # --- this host owns it
    ("running here under a stale token", "h1", dict(), running(6), Action.KILL, "stale"),
    ("its guest panicked", "h1", dict(), {"web": LocalVm("web", RunState.RUNNING, 7, None, PANIC)},
     Action.GUEST_FAILED, "kernel panic"),
    ("its guest failed once too often: left stopped, released", "h1", dict(guest=GAVE_UP), {},
     Action.RELEASE, "left stopped: guest failed 4 times"),
    ("unowned, its guest failed once too often: not started anywhere", "h2", dict(owner=None, guest=GAVE_UP), {},
     Action.WAIT, "left stopped"),
    ("its migration target listens", "h1", dict(migration=MIGRATION, incoming=INCOMING), running(),
     Action.MIGRATE, "live migration to h2"),
    ("a level change asked", "h1", dict(level_change=LevelChange(2, "h1", 7, 1.0)), running(),
     Action.CHANGE_LEVEL, "level 1 -> 2"),
    ("a level change asked under another token is not this owner's", "h1",
     dict(level_change=LevelChange(2, "h1", 5, 1.0)), running(), Action.WAIT, "running"),
    ("failback to its preferred host", "h2",
     dict(owner=Ownership("h2", 7), spec=replace(SPEC, failback=True),
          status=VmStatus("h2", RunState.RUNNING, 7, 1.0)), running(), Action.FAILBACK, "h1"),
    ("running", "h1", dict(), running(), Action.WAIT, "running"),
    ("received by live migration: resume it", "h1", dict(), running(7, RunState.INCOMING), Action.START,
     "resuming the received VM"),
    ("crashed: start again", "h1", dict(), {"web": LocalVm("web", RunState.CRASHED, 7, -9)}, Action.START,
     "exited unasked"),
    ("claimed after another host lost it", "h1", dict(home="h2"), {}, Action.START, "taking over from h2"),
    ("claimed at home", "h1", dict(home="h1"), {}, Action.START, "owned here, not running"),
    ("desired stopped, being stopped", "h1", dict(spec=replace(SPEC, desired=Desired.STOPPED)),
     running(7, RunState.STOPPING), Action.WAIT, "stopping"),
    ("desired stopped, running", "h1", dict(spec=replace(SPEC, desired=Desired.STOPPED)), running(),
     Action.STOP, "desired state is stopped"),
    ("desired stopped, QEMU gone", "h1", dict(spec=replace(SPEC, desired=Desired.STOPPED)), {},
     Action.RELEASE, "releasing ownership"),
]


@pytest.mark.parametrize("case, me, fields, vms, action, why", CASES, ids=[c[0] for c in CASES])
def test_decide(case: str, me: str, fields: dict[str, Any], vms: dict[str, LocalVm], action: Action,
                why: str) -> None:
    view = VmView(**({"spec": SPEC, "owner": OWNED, "home": "h1"} | fields))
    snap = PoolSnapshot(5, HOSTS, {"web": view})
    [d] = [d for d in decide(snap, LocalView(me, vms, now=1000.0)).decisions if d.vm == "web"]
    assert d.action is action and why in d.reason, d
    if action in (Action.START, Action.STOP, Action.RELEASE, Action.MIGRATE, Action.CHANGE_LEVEL,
                  Action.FAILBACK):
        assert d.token == (view.owner.token if view.owner else None)  # every owner action is fenced


def test_replace_partner_when_a_level2_partner_stays_down() -> None:
    """Level 2 owner whose partner host left the pool long enough ago: a new replica elsewhere."""
    hosts = HOSTS | {"h3": HostInfo("h3", 4096, 4, (SHARED,), replication_addr="10.79.0.3")}
    hosts.pop("h2")
    spec = replace(SPEC, level=Level.COMPONENT, disks=(DiskSpec(size=64 << 20),))
    view = VmView(spec, owner=OWNED, home="h1", copies=L2_COPIES)
    snap = PoolSnapshot(5, hosts, {"web": view})
    [d] = [d for d in decide(snap, LocalView("h1", running(), now=1000.0), 60.0).decisions if d.vm == "web"]
    assert (d.action, d.target) == (Action.REPLACE_PARTNER, "h3") and "h2 down" in d.reason
    [early] = [d for d in decide(snap, LocalView("h1", running(), now=30.0), 60.0).decisions if d.vm == "web"]
    assert early.action is Action.WAIT


def test_a_level2_vm_first_started_without_a_partner_gets_one_when_a_host_can_keep_it() -> None:
    """Started while no other host was live (its copies record names no partner): once one
    is, a replica is built there, at once (found by the simulator: it stayed alone)."""
    spec = replace(SPEC, level=Level.COMPONENT, disks=(DiskSpec(size=64 << 20),))
    view = VmView(spec, owner=OWNED, home="h1", copies=new_copies("h1", None, 1.0))
    [d] = [d for d in decide(PoolSnapshot(5, HOSTS, {"web": view}), LocalView("h1", running(), now=2.0),
                             60.0).decisions if d.vm == "web"]
    assert (d.action, d.target) == (Action.REPLACE_PARTNER, "h2") and "no partner" in d.reason
    alone = {"h1": HOSTS["h1"]}
    [d] = [d for d in decide(PoolSnapshot(5, alone, {"web": view}), LocalView("h1", running(), now=2.0),
                             60.0).decisions if d.vm == "web"]
    assert d.action is Action.WAIT


def _plan(level: Level, fields: dict[str, Any] | None = None, spec: VmSpec = SPEC, paths: tuple[str, ...] = (),
          overwrite: bool = False, exists: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    from ftvm.core.transitions import plan_level_change
    status = VmStatus("h1", RunState.RUNNING, 7, 1.0)
    view = VmView(**({"spec": spec, "owner": OWNED, "home": "h1", "status": status} | (fields or {})))
    return plan_level_change(PoolSnapshot(5, HOSTS, {"web": view}), view, spec, level, paths, overwrite,
                             lambda p: p in exists)


def test_level_change_admission() -> None:
    """`vm set --level`: what each request becomes, or the outcome and reason it is refused."""
    from ftvm.core.transitions import How
    from ftvm.errors import BAD_INPUT, REFUSED, Problem
    stopped = replace(SPEC, desired=Desired.STOPPED)
    l3 = replace(SPEC, level=Level.SYSTEM, disks=(DiskSpec(size=64 << 20),))
    starting = {"status": VmStatus("h1", RunState.STARTING, 7, 1.0)}
    rows: list[tuple[str, Any, How | tuple[int, str]]] = [
        ("same level", _plan(Level.RESTART), How.NOTHING),
        ("a stopped VM", _plan(Level.COMPONENT, {"owner": None}, stopped), How.STOPPED),
        ("a stopped VM to level 3", _plan(Level.SYSTEM, {"owner": None}, stopped), (REFUSED, "running VM")),
        ("while starting", _plan(Level.COMPONENT, starting), (REFUSED, "starting or stopping")),
        ("while migrating", _plan(Level.COMPONENT, {"migration": MIGRATION}), (REFUSED, "migrating to h2")),
        ("while another change runs", _plan(Level.COMPONENT, {"level_change": LevelChange(2, "h1", 7, 1.0)}),
         (REFUSED, "already changing")),
        ("1 -> 0: the spec only", _plan(Level.UNPROTECTED), How.SPEC),
        ("1 -> 2 online", _plan(Level.COMPONENT), How.ONLINE),
        ("1 -> 3 online", _plan(Level.SYSTEM), How.ONLINE),
        ("3 -> 1 onto an existing image", _plan(Level.RESTART, spec=l3, paths=(f"{SHARED}/x.img",),
                                                exists=frozenset({f"{SHARED}/x.img"})), (REFUSED, "--overwrite")),
        ("3 -> 1 onto it with --overwrite", _plan(Level.RESTART, spec=l3, paths=(f"{SHARED}/x.img",),
                                                  overwrite=True, exists=frozenset({f"{SHARED}/x.img"})),
         How.ONLINE),
        ("3 -> 1 off shared storage", _plan(Level.RESTART, spec=l3, paths=("/etc/x.img",)),
         (BAD_INPUT, "not on storage h1 shares")),
        ("3 -> 1 without paths", _plan(Level.RESTART, spec=replace(l3, disks=(DiskSpec(size=1 << 20),))),
         (BAD_INPUT, "--disk-path")),
    ]
    for case, got, want in rows:
        if isinstance(want, How):
            assert not isinstance(got, Problem) and got.how is want, (case, got)
        else:
            assert isinstance(got, Problem) and got.code == want[0] and want[1] in got, (case, got)
    online = _plan(Level.RESTART, spec=l3, paths=(f"{SHARED}/x.img",))
    assert not isinstance(online, Problem) and online.disk_paths == (f"{SHARED}/x.img",)
