"""Pool operations shared by the CLI and the REST API: check, then change the store.

Each either does what was asked or raises `FtvmError` with the reason and changes
nothing. Waiting for the agents to act on a change is the caller's business.
"""

from __future__ import annotations

import os
from collections.abc import Callable
import time
from typing import Any
from dataclasses import replace

from .core.availability import Report, report
from .core.model import (DR_FAILOVER_MARGIN_S, DR_SWITCH_LEVEL3, Desired, DiskSpec, DrFailover, DrReplica, DrTarget,
                         DrTest, Level, LevelChange, Migration, PoolSnapshot, VmSpec, VmView, receiver_problem,
                         spec_problem, valid_name)
from .core.dr_points import dr_loss, seconds_lost
from .core.sites import sites
from .core.placement import migration_problem, overcommit_problem, plan_evacuation
from .core.transitions import How, plan_level_change
from .core.validate import check_new_vm
from .qemu.images import image_problem
from .errors import BAD_INPUT, NOT_FOUND, REFUSED, FtvmError, Problem
from .store.pool import Event, PoolStore
from .views import dr_row


async def get_view(store: PoolStore, name: str) -> tuple[PoolSnapshot, VmView]:
    snap = await store.snapshot()
    if name in snap.frozen:
        f = snap.frozen[name]
        raise FtvmError(f"VM {name}: {f.reason}; fix or delete {f.problem.key} (nothing changed)", REFUSED)
    if name not in snap.vms:
        raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
    return snap, snap.vms[name]


async def define(store: PoolStore, spec: VmSpec) -> None:
    snap = await store.snapshot()
    problem = (check_new_vm(spec, snap, os.path.isfile, image_problem) or health_address_problem(spec)
               or site_problem(snap, spec.site))
    if problem:
        raise FtvmError(problem, problem.code if isinstance(problem, Problem) else BAD_INPUT)
    if spec.desired is Desired.RUNNING:
        problem = overcommit_problem(snap, spec)
        if problem:
            raise FtvmError(problem + "; nothing defined", REFUSED)
    if not await store.define_vm(spec):
        raise FtvmError(f"VM {spec.name} already exists", REFUSED)


async def set_desired(store: PoolStore, name: str, desired: Desired, force: bool = False) -> bool:
    """Returns whether anything changed. `force` (stop only): power the guest off at once
    instead of asking it first; it also hurries a stop already under way."""
    if force and desired is not Desired.STOPPED:
        raise FtvmError("force goes with a stop only", BAD_INPUT)
    while True:
        got = await store.spec(name)
        if got is None:
            raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
        spec, rev = got
        if desired is Desired.RUNNING and spec.dr_failed_over:
            raise FtvmError(f"{name} {spec.dr_failed_over}. It runs at the DR site now: only `ftvm dr failback "
                            f"{name}` brings it back here", REFUSED)
        if desired is Desired.RUNNING:  # an operator's start: ftvm tries a failing guest again
            snap = await store.snapshot()
            view = snap.vms.get(name)
            if view is not None and view.guest is not None and view.guest.gave_up:
                await store.clear_guest(name)
                if spec.desired is desired:
                    return True
        if spec.desired is desired and spec.stop_force >= force:
            return False
        if desired is Desired.RUNNING:
            snap = await store.snapshot()
            view = snap.vms.get(name)
            problem = overcommit_problem(snap, spec) if view is not None and view.owner is None else None
            if problem:
                raise FtvmError(problem, REFUSED)
        if await store.update_spec(replace(spec, desired=desired, stop_force=force), rev):
            return True


async def remove(store: PoolStore, name: str) -> None:
    _, view = await get_view(store, name)
    if view.owner is not None or view.spec.desired is Desired.RUNNING:
        raise FtvmError(f"VM {name} is not stopped: stop it first (`ftvm vm stop {name} --wait`)", REFUSED)
    got = await store.spec(name)
    if got is None or not await store.remove_vm(name, got[1]):
        raise FtvmError(f"VM {name} changed while being removed; nothing removed", REFUSED)


async def change_level(store: PoolStore, name: str, level: int,
                       disk_paths: tuple[str, ...] = (), overwrite: bool = False) -> tuple[int, bool]:
    """Change a VM's protection level. A stopped VM's spec changes at once; a running VM
    changes without a restart (its owner's agent does the work: agent/levels.py). The rules
    are core/transitions.py's `plan_level_change`.
    Returns (previous level, whether the change is online and still under way)."""
    if level not in (0, 1, 2, 3):
        raise FtvmError(f"level {level} does not exist (0, 1, 2 or 3)", BAD_INPUT)
    snap, view = await get_view(store, name)
    got = await store.spec(name)
    if got is None:
        raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
    spec, rev = got
    plan = plan_level_change(snap, view, spec, Level(level), disk_paths, overwrite, os.path.exists)
    if isinstance(plan, Problem):
        raise FtvmError(plan, plan.code)
    old = int(spec.level)
    if plan.how is How.NOTHING:
        return old, False
    if plan.how is How.STOPPED:
        await _change_stopped_level(store, snap, spec, rev, level)
        return old, False
    if plan.how is How.SPEC:
        if not await store.update_spec(plan.spec, rev):
            raise FtvmError(f"VM {name} changed meanwhile; nothing changed", REFUSED)
        return old, False
    assert view.owner is not None
    owner = view.owner.host
    change = LevelChange(level=level, source=owner, token=view.owner.token, requested=time.time(),
                         disk_paths=plan.disk_paths, overwrite=overwrite)
    if not await store.request_level_change(name, change, snap.hosts[owner].lease_id):
        raise FtvmError(f"VM {name} changed meanwhile (moved, or another change began); nothing changed", REFUSED)
    return old, True


async def _change_stopped_level(store: PoolStore, snap: PoolSnapshot, spec: VmSpec, rev: int, level: int) -> None:
    if spec.level.has_copies:
        raise FtvmError(f"lowering a stopped level {int(spec.level)} VM is not available: its data lives in the "
                        "hosts' local copies; start it and lower the level while it runs", REFUSED)
    disks = spec.disks
    if level == 2:
        disks = tuple(with_image_size(d) for d in spec.disks)
    new = replace(spec, level=Level(level), disks=disks)
    others = PoolSnapshot(snap.revision, snap.hosts, {n: v for n, v in snap.vms.items() if n != spec.name})
    problem = check_new_vm(new, others, os.path.isfile, image_problem)
    if problem:
        raise FtvmError(problem, BAD_INPUT)
    if not await store.update_spec(new, rev):
        raise FtvmError(f"VM {spec.name} changed meanwhile; nothing changed", REFUSED)


def with_image_size(disk: DiskSpec) -> DiskSpec:
    """A level 2 disk imported from an image: its size is the image's."""
    from .qemu.blockgraph import LocalImage
    from .qemu.storage_daemon import StorageDaemonError, image_size
    if not os.path.isfile(disk.path):
        raise FtvmError(f"disk image {disk.path} does not exist", BAD_INPUT)
    try:
        return replace(disk, size=image_size(LocalImage(disk.path, disk.format)))
    except StorageDaemonError as e:
        raise FtvmError(f"cannot read disk image {disk.path}: {e}", BAD_INPUT) from None


async def set_sla(store: PoolStore, name: str, percent: float | None) -> VmSpec:
    """The availability target reports compare with (None: no target)."""
    if percent is not None and not 0 < percent <= 100:
        raise FtvmError(f"SLA target {percent}% must be above 0 and at most 100", BAD_INPUT)
    return await _change_spec(store, name, lambda spec: replace(spec, sla_percent=percent))


async def _change_spec(store: PoolStore, name: str, change: Callable[[VmSpec], VmSpec]) -> VmSpec:
    """Compare-and-set the VM's spec to `change(spec)`, again from the new spec whenever
    someone changed it meanwhile. `change` refuses by raising FtvmError (nothing changed)."""
    while True:
        got = await store.spec(name)
        if got is None:
            raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
        spec, rev = got
        new = change(spec)
        if await store.update_spec(new, rev):
            return new


async def force_start(store: PoolStore, name: str, host: str | None) -> str:
    """Let a level 2 VM start from a copy that is not current: the operator accepts losing
    what that copy lacks. Recorded in the event log. Returns the host whose copy is used."""
    snap, view = await get_view(store, name)
    if view.spec.level is not Level.COMPONENT or view.copies is None:
        raise FtvmError("--accept-data-loss is for level 2 VMs that have copies", BAD_INPUT)
    if view.owner is not None:
        raise FtvmError(f"VM {name} is running on {view.owner.host}: nothing to force", REFUSED)
    holders = sorted(h for h in view.copies.copies if h in snap.hosts)
    host = host or (holders[0] if len(holders) == 1 else None)
    if host is None:
        raise FtvmError(f"say which copy to start from: --host one of {', '.join(holders) or '(none up)'}",
                        BAD_INPUT)
    if host not in view.copies.copies:
        raise FtvmError(f"{host} holds no copy of {name}", BAD_INPUT)
    if host not in snap.hosts:
        raise FtvmError(f"host {host} is not up", REFUSED)
    copy = view.copies.copies[host]
    if not await store.force_start(name, host):
        raise FtvmError(f"VM {name} changed meanwhile; nothing forced", REFUSED)
    await store.add_event(Event(time.time(), "operator", name, "force",
                                f"start on {host} forced, accepting data loss: its copy is "
                                f"{copy.state.value} ({copy.reason})"))
    return host


async def repair_disk(store: PoolStore, name: str, host: str) -> None:
    """A failed level 2 copy sits on working storage again: it is resynced in full from the
    partner while the VM runs, then mirrored."""
    _, view = await get_view(store, name)
    copy = view.copies.state_of(host) if view.copies else None
    if view.spec.level is not Level.COMPONENT or copy is None:
        raise FtvmError(f"{host} holds no level 2 copy of {name}", BAD_INPUT)
    if copy.state.value != "failed":
        raise FtvmError(f"the copy on {host} has not failed (it is {copy.state.value})", REFUSED)
    if not await store.request_repair(name, host):
        raise FtvmError(f"VM {name} changed meanwhile; nothing done", REFUSED)
    await store.add_event(Event(time.time(), "operator", name, "repair",
                                f"storage of the copy on {host} declared repaired"))


async def set_failback(store: PoolStore, name: str, on: bool) -> VmSpec:
    """Failback policy: move the VM back live to its preferred host whenever that host can
    run it again (after maintenance or a failure; levels 2-3 once its copy there is current)."""
    def change(spec: VmSpec) -> VmSpec:
        if on and spec.preferred_host is None:
            raise FtvmError(f"VM {name} has no preferred host to fail back to (`vm add --host H`)", BAD_INPUT)
        return replace(spec, failback=on)
    return await _change_spec(store, name, change)


def site_problem(snap: PoolSnapshot, site: str) -> str | None:
    """A VM's preferred site must be one where a live host stands (core/sites.py)."""
    known = sites(snap)
    if not site or site in known:
        return None
    return (f"no live host stands at site {site!r} ("
            + (f"the pool's sites: {', '.join(sorted(known))}" if known else "no host names a site: host.toml `site`")
            + "); nothing changed")


async def set_site(store: PoolStore, name: str, site: str) -> VmSpec:
    """A VM's preferred site ("" none): where it runs when it can, and which site keeps it
    when the sites lose each other (core/sites.py). Its running copy stays where it is."""
    if not isinstance(site, str):
        raise FtvmError("site must be a text", BAD_INPUT)
    unknown = site_problem(await store.snapshot(), site)

    def change(spec: VmSpec) -> VmSpec:
        new = replace(spec, site=site)
        problem = spec_problem(new) or unknown
        if problem:
            raise FtvmError(problem, BAD_INPUT)
        return new
    return await _change_spec(store, name, change)


async def set_dr_target(store: PoolStore, name: str, receivers: list[str]) -> DrTarget:
    """Where this pool's DR points may go: another pool's receivers (its hosts' dr_listen)."""
    if not isinstance(name, str) or not valid_name(name):
        raise FtvmError(f"invalid DR target name {name!r}", BAD_INPUT)
    if (not isinstance(receivers, list) or not 0 < len(receivers) <= 8
            or not all(isinstance(r, str) for r in receivers)):
        raise FtvmError("give 1 to 8 receivers (ADDR:PORT)", BAD_INPUT)
    for r in receivers:
        problem = receiver_problem(r)
        if problem:
            raise FtvmError(f"{problem}; nothing changed", BAD_INPUT)
    target = DrTarget(name, tuple(receivers))
    await store.set_dr_target(target)
    return target


async def remove_dr_target(store: PoolStore, name: str) -> None:
    snap = await store.snapshot()
    if name not in snap.dr_targets:
        raise FtvmError(f"unknown DR target {name!r}", NOT_FOUND)
    users = sorted(v.spec.name for v in snap.vms.values() if v.spec.dr_target == name)
    if users:
        raise FtvmError(f"DR target {name} protects {', '.join(users)}: `ftvm dr remove` them first", REFUSED)
    await store.remove_dr_target(name)


async def set_dr(store: PoolStore, name: str, target: str, rpo_s: float) -> VmSpec:
    """Protect a VM at the DR target (its owner starts shipping recovery points), or
    (`target` "") stop doing so; the DR site keeps what it has."""
    if not isinstance(target, str) or isinstance(rpo_s, bool) or not isinstance(rpo_s, (int, float)):
        raise FtvmError("dr_target must be a text and dr_rpo_s a number", BAD_INPUT)
    if target and target not in (await store.snapshot()).dr_targets:
        raise FtvmError(f"unknown DR target {target!r} (`ftvm dr target add`); nothing changed", BAD_INPUT)

    def change(spec: VmSpec) -> VmSpec:
        new = replace(spec, dr_target=target, dr_rpo_s=float(rpo_s) if target else 0.0)
        problem = spec_problem(new)
        if problem:
            raise FtvmError(f"{problem}; nothing changed", BAD_INPUT)
        return new
    return await _change_spec(store, name, change)


def _dr_replica(snap: PoolSnapshot, vm: str, source: str | None) -> DrReplica:
    found = [r for (pool, name), r in snap.dr_replicas.items() if name == vm and source in (None, pool)]
    if not found:
        raise FtvmError(f"this pool keeps no recovery points of VM {vm}" + (f" of pool {source}" if source else "")
                        + " (ask the DR pool)", NOT_FOUND)
    if len(found) > 1:
        raise FtvmError(f"VMs named {vm} of several pools ({', '.join(r.pool for r in found)}): give the pool",
                        BAD_INPUT)
    return found[0]


def dr_test_name(vm: str) -> str:
    """The name a VM's test copy runs under at the DR site."""
    return f"{vm[:26]}-drt"


async def dr_test(store: PoolStore, vm: str, source: str | None = None, point: int | None = None) -> DrTest:
    """A test failover at the DR site (this pool): the host keeping `vm`'s points starts a
    copy of `point` (default the newest) on an isolated network, as VM `<vm>-drt`. The
    replica and its replication go on untouched: the copy runs on images made for it."""
    snap = await store.snapshot()
    replica = _dr_replica(snap, vm, source)
    numbers = [p.number for p in replica.points]
    if not numbers:
        raise FtvmError(f"no recovery point of {vm} yet", REFUSED)
    if point is None:
        point = numbers[-1]
    elif point not in numbers:
        raise FtvmError(f"no point {point} of {vm} (points {numbers[0]}-{numbers[-1]}: `ftvm dr points {vm}`)",
                        NOT_FOUND)
    test_vm = dr_test_name(vm)
    if test_vm in snap.vms:
        raise FtvmError(f"a VM named {test_vm} exists: end the test before (`ftvm dr test-end {vm}`)", REFUSED)
    if replica.host not in snap.hosts:
        raise FtvmError(f"{replica.host}, which keeps the points of {vm}, is down", REFUSED)
    test = DrTest(replica.pool, vm, point, replica.host, test_vm, time.time())
    if not await store.request_dr_test(test):
        raise FtvmError(f"a test failover of {vm} is under way: `ftvm dr test-end {vm}` first", REFUSED)
    return test


async def dr_failover(store: PoolStore, vm: str, source: str | None = None, point: int | None = None,
                      accept_data_loss: bool = False, level: int = 0) -> DrFailover:
    """A real failover at the DR site (this pool): the host keeping `vm`'s points starts
    `point` (default the newest) as the VM itself, at level 0. Refused without
    `accept_data_loss` (the error states what would be lost), while the source was heard
    too recently to be known gone, or if this pool has a VM of that name."""
    snap = await store.snapshot()
    replica = _dr_replica(snap, vm, source)
    numbers = [p.number for p in replica.points]
    if not numbers:
        raise FtvmError(f"no recovery point of {vm} yet: nothing to fail over to", REFUSED)
    newest = point is None
    if point is None:
        point = numbers[-1]
    elif point not in numbers:
        raise FtvmError(f"no point {point} of {vm} (points {numbers[0]}-{numbers[-1]}: `ftvm dr points {vm}`)",
                        NOT_FOUND)
    existing = snap.dr_failovers.get((replica.pool, vm))
    if existing is not None and (existing.started or vm in snap.vms):
        raise FtvmError(f"{replica.pool}/{vm} is failed over to this pool already", REFUSED)
    if vm in snap.vms:
        raise FtvmError(f"this pool has a VM named {vm} already: the failover would start {replica.pool}/{vm} "
                        "under that name", REFUSED)
    if level not in (0, 2, 3):
        raise FtvmError(f"a failover starts the VM at level 0, 2 or 3 (its images are made on the host keeping its "
                        f"points; for level 1, raise it afterwards with `ftvm vm level {vm} 1 --disk PATH`)",
                        BAD_INPUT)
    if level and len(snap.hosts) < 2:
        raise FtvmError(f"level {level} needs a second host in this pool; it has {len(snap.hosts)}", REFUSED)
    if replica.host not in snap.hosts:
        raise FtvmError(f"{replica.host}, which keeps the points of {vm}, is down", REFUSED)
    now = time.time()
    loss = dr_loss(replica, point, now)
    if not accept_data_loss:
        raise FtvmError(f"failing {replica.pool}/{vm} over to point {point} {loss}. Give --accept-data-loss to "
                        "do it", REFUSED)
    silent = now - replica.contact.heard_at
    wait = replica.contact.confirm_s + DR_FAILOVER_MARGIN_S - silent
    failover = DrFailover(replica.pool, vm, point, replica.host, now, loss, newest=newest,
                          lost_s=seconds_lost(replica, point), level=level)
    if existing is not None:  # (asked before and failed: asked again)
        await store.end_dr_failover(replica.pool, vm)
    if not await store.request_dr_failover(failover):
        raise FtvmError(f"a failover of {vm} was just asked", REFUSED)
    if wait > 0:  # (the host keeping the points waits it out: it knows the last contact exactly)
        needed = replica.contact.confirm_s + DR_FAILOVER_MARGIN_S
        failover = replace(failover, loss=f"{loss} (starts once {replica.pool} has been silent for {needed:g} s: "
                                          f"about {wait:.0f} s)")
    return failover


async def dr_failback(store: PoolStore, vm: str, source: str | None = None, target: str = "",
                      rpo_s: float = 9.0, switch: bool = False) -> DrFailover:
    """At the DR pool, for a VM failed over here: send its writes back to its home pool
    (`target`, a DR target naming that pool's receivers; the first point there is a diff
    against its old copy), then (`switch`, once that caught up) a short planned switchover:
    its owner here pauses it, ships a last point, stops it, and the home pool starts it from
    that point."""
    snap = await store.snapshot()
    found = [f for (pool, name), f in snap.dr_failovers.items() if name == vm and source in (None, pool)]
    if not found:
        raise FtvmError(f"{vm} was not failed over to this pool", NOT_FOUND)
    if len(found) > 1:
        raise FtvmError(f"VMs named {vm} of several pools were failed over here: give the pool", BAD_INPUT)
    failover = found[0]
    view = snap.vms.get(vm)
    if view is None or view.owner is None:
        raise FtvmError(f"{vm} does not run in this pool: nothing to fail back", REFUSED)
    if not switch:
        if target not in snap.dr_targets:
            raise FtvmError(f"unknown DR target {target!r}: add the home pool's receivers first (`ftvm dr target "
                            "add`); nothing changed", BAD_INPUT)
        await set_dr(store, vm, target, rpo_s)
        failover = replace(failover, failback_target=target)
        await store.update_dr_failover(failover)
        return failover
    if not failover.failback_target or view.spec.dr_target != failover.failback_target:
        raise FtvmError(f"start the failback first (`ftvm dr failback {vm} --to TARGET`), then switch once its "
                        "points caught up", REFUSED)
    if view.spec.level is Level.SYSTEM:
        raise FtvmError(f"{DR_SWITCH_LEVEL3}: lower it first (`ftvm vm level {vm} 2`, online), then switch; "
                        "nothing changed", REFUSED)
    row = dr_row(view, time.time())
    if row is None or not row["newest"] or row["error"] or not row["within_rpo"]:
        why = (row or {}).get("error") or f"lag {(row or {}).get('lag_s')} s, RPO {view.spec.dr_rpo_s:g} s"
        raise FtvmError(f"{vm}'s points have not caught up with its home pool yet ({why}): switching now "
                        "would pause it for the whole backlog", REFUSED)
    failover = replace(failover, switch_at=time.time())
    await store.update_dr_failover(failover)
    return failover


async def dr_test_end(store: PoolStore, vm: str, source: str | None = None) -> DrTest:
    """End a test failover: its copy is powered off and removed with its images."""
    snap = await store.snapshot()
    tests = [t for (pool, name), t in snap.dr_tests.items() if name == vm and source in (None, pool)]
    if not tests:
        raise FtvmError(f"no test failover of {vm} is under way", NOT_FOUND)
    if len(tests) > 1:
        raise FtvmError(f"test failovers of {vm} of several pools: give the pool", BAD_INPUT)
    test = tests[0]
    if test.test_vm in snap.vms:
        await set_desired(store, test.test_vm, Desired.STOPPED, force=True)
    await store.end_dr_test(test.pool, test.vm)
    return test


async def availability(store: PoolStore, start: float, end: float,
                       names: list[str] | None = None) -> list[Report]:
    """Availability reports of the given VMs (default: every defined VM) over [start, end)."""
    if end <= start:
        raise FtvmError("the report period is empty", BAD_INPUT)
    snap = await store.snapshot()
    wanted = names or sorted(snap.vms)
    unknown = [n for n in wanted if n not in snap.vms]
    history = await store.history()
    if unknown and not all(n in history for n in unknown):
        raise FtvmError(f"unknown VM {', '.join(repr(n) for n in unknown if n not in history)}", NOT_FOUND)
    out = []
    for name in wanted:
        sla = snap.vms[name].spec.sla_percent if name in snap.vms else None
        rep = report(name, history.get(name, []), start, end, sla)
        if name in snap.vms:
            rep.dr = dr_row(snap.vms[name], end)  # the DR RPO each VM is held to, and its lag now
        out.append(rep)
    return out


async def set_checkpointing(store: PoolStore, name: str, interval_ms: int | None,
                            on_output: bool | None) -> VmSpec:
    """A level 3 VM's checkpoint interval/trigger; a running VM follows within seconds."""
    await get_view(store, name)
    got = await store.spec(name)
    if got is None:
        raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
    spec, rev = got
    if spec.level is not Level.SYSTEM:
        raise FtvmError(f"VM {name} is level {int(spec.level)}: checkpointing is for level 3", BAD_INPUT)
    new = replace(spec, checkpoint_ms=spec.checkpoint_ms if interval_ms is None else interval_ms,
                  checkpoint_on_output=spec.checkpoint_on_output if on_output is None else on_output)
    if not 20 <= new.checkpoint_ms <= 10_000:
        raise FtvmError(f"checkpoint interval {new.checkpoint_ms} ms must be between 20 and 10000", BAD_INPUT)
    if not await store.update_spec(new, rev):
        raise FtvmError(f"VM {name} changed meanwhile; nothing changed", REFUSED)
    return new


async def migrate(store: PoolStore, name: str, target: str) -> Migration:
    snap, view = await get_view(store, name)
    problem = migration_problem(snap, view, target)
    if problem:
        raise FtvmError(problem, problem.code if isinstance(problem, Problem) else REFUSED)
    assert view.owner is not None
    m = Migration(to=target, source=view.owner.host, token=view.owner.token, started=time.time())
    if not await store.request_migration(name, view.owner.token, m, snap.hosts[view.owner.host].lease_id):
        raise FtvmError(f"VM {name} changed meanwhile (or is already migrating); nothing changed", REFUSED)
    return m


async def start_maintenance(store: PoolStore, host: str, reason: str) -> dict[str, str]:
    """Move every VM off `host` live, then keep it empty. Refused, changing nothing, if
    any VM cannot move."""
    snap = await store.snapshot()
    if host not in snap.hosts:
        raise FtvmError(f"host {host} is not a live host of the pool", NOT_FOUND)
    planned, problems = plan_evacuation(snap, host)
    if problems:
        raise FtvmError(f"cannot empty {host}: " + "; ".join(problems), REFUSED)
    await store.set_maintenance(host, True, reason)
    for name, target in planned.items():
        await migrate(store, name, target)
    return planned


async def end_maintenance(store: PoolStore, host: str) -> None:
    snap = await store.snapshot()
    if host not in snap.maintenance:
        raise FtvmError(f"host {host} is not in maintenance", REFUSED)
    await store.set_maintenance(host, False)


# a guest's own failures: how they are detected (health probe) and how often restarted
GUEST_MONITORING: dict[str, type] = {"health": str, "health_interval_s": float, "health_timeout_s": float,
                                     "health_failures": int, "health_grace_s": float,
                                     "guest_restarts": int, "guest_window_s": float}
PATCHABLE = ("checkpoint_ms", "checkpoint_on_output", "sla_percent", *GUEST_MONITORING, "site", "dr_target", "dr_rpo_s",
             "failback")


async def set_guest_monitoring(store: PoolStore, name: str, changes: dict[str, Any]) -> VmSpec:
    """A VM's health probe and restart limit (see GUEST_MONITORING); the agent running it
    follows at its next tick."""
    fields: dict[str, Any] = {}
    for key, value in changes.items():
        want = GUEST_MONITORING[key]
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if isinstance(value, bool) or not ok:
            raise FtvmError(f"{key} must be {'a text' if want is str else 'a number'}; nothing changed", BAD_INPUT)
        fields[key] = float(value) if want is float else value
    await get_view(store, name)

    def change(spec: VmSpec) -> VmSpec:
        new = replace(spec, **fields)
        problem = spec_problem(new) or health_address_problem(new)
        if problem:
            raise FtvmError(f"{problem}; nothing changed", BAD_INPUT)
        return new
    return await _change_spec(store, name, change)


def health_address_problem(spec: VmSpec) -> str | None:
    """A probe goes to the VM's first address: a VM without one cannot have a probe."""
    if spec.health and not any(nic.ip for nic in spec.nics):
        return f"health probe {spec.health}: the VM's NIC has no address to probe (vm add --ip ADDR/PREFIX)"
    return None


async def patch(store: PoolStore, name: str, changes: dict[str, Any]) -> VmSpec:
    """Change a VM's settings from a {field: value} object (the API's PATCH, the CLI's
    `vm set`), each checked as its own operation checks it. The level is changed apart
    (`change_level`): it starts an operation of its own."""
    unknown = set(changes) - set(PATCHABLE)
    if unknown or not changes:
        raise FtvmError("only level (+ disk_paths), " + ", ".join(PATCHABLE[:-1]) + f" and {PATCHABLE[-1]} "
                        "can be changed here" + (f" (not {', '.join(sorted(unknown))})" if unknown else ""),
                        BAD_INPUT)
    spec: VmSpec | None = None
    if "failback" in changes:
        if not isinstance(changes["failback"], bool):
            raise FtvmError("failback must be true or false", BAD_INPUT)
        spec = await set_failback(store, name, changes["failback"])
    if "site" in changes:
        spec = await set_site(store, name, changes["site"])
    if "dr_target" in changes or "dr_rpo_s" in changes:
        spec = await set_dr(store, name, changes.get("dr_target", ""), changes.get("dr_rpo_s", 0.0))
    if "sla_percent" in changes:
        spec = await set_sla(store, name, changes["sla_percent"])
    monitoring = {k: v for k, v in changes.items() if k in GUEST_MONITORING}
    if monitoring:
        spec = await set_guest_monitoring(store, name, monitoring)
    if {"checkpoint_ms", "checkpoint_on_output"} & set(changes):
        spec = await set_checkpointing(store, name, changes.get("checkpoint_ms"), changes.get("checkpoint_on_output"))
    assert spec is not None
    return spec
