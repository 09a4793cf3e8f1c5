"""Where a VM's partner copy goes (levels 2 and 3), and when a lost partner is replaced (pure).

With 3 or 4 hosts the partner is chosen so that one host's loss leaves every VM a
place to go: a partner must have room for the VM *on top of* what it would already
take over if the same primary were lost (the failover reserve); among those a host at
another site than the primary's comes first (SplitSite: core/sites.py), then the host
that is partner to the fewest VMs (spreading the duty), then the one with most free
memory, then by name (every agent computes the same answer).
"""

from __future__ import annotations

from ..errors import NOT_FOUND, Problem
from .model import Level, PoolSnapshot, RunState, VmSpec, VmView
from .replication import Copies, claim_copies, may_start_on


def partner_duties(snapshot: PoolSnapshot, host: str) -> int:
    """How many VMs running elsewhere keep a copy on `host`."""
    return sum(1 for v in snapshot.vms.values()
               if v.copies is not None and host in v.copies.copies and v.owner is not None
               and v.owner.host != host)


def failover_reserve(snapshot: PoolSnapshot, host: str, primary: str, exclude: str = "") -> tuple[int, int]:
    """Memory (MiB) and vCPUs `host` would have to take over if `primary` were lost: the
    VMs running on `primary` whose partner is `host`. A level 3 VM's memory is not in it:
    its RAM replica already holds that memory on `host` (`PoolSnapshot.used_memory`)."""
    mem = cpus = 0
    for name, v in snapshot.vms.items():
        if name == exclude or v.owner is None or v.owner.host != primary or v.copies is None:
            continue
        if v.copies.partner_of(primary) == host:
            if v.spec.level is not Level.SYSTEM:
                mem += v.spec.memory_mib
            cpus += v.spec.vcpus
    return mem, cpus


def partner_candidates(snapshot: PoolSnapshot, spec: VmSpec, primary: str) -> list[str]:
    """Live hosts that could keep `spec`'s copy while it runs on `primary`, best first."""
    def room(h: str) -> bool:
        info = snapshot.hosts[h]
        mem, cpus = failover_reserve(snapshot, h, primary, exclude=spec.name)
        return (snapshot.used_memory(h, exclude=spec.name) + mem + spec.memory_mib <= info.memory_mib
                and snapshot.used_vcpus(h) + cpus + spec.vcpus <= info.vcpus)

    site = snapshot.hosts[primary].site if primary in snapshot.hosts else ""

    def same_site(h: str) -> bool:  # SplitSite: the partner at another site survives the primary's site
        return bool(site) and snapshot.hosts[h].site == site

    hosts = [h for h in snapshot.hosts
             if h != primary and h not in snapshot.maintenance and snapshot.hosts[h].replication_addr]
    return sorted(hosts, key=lambda h: (not room(h), same_site(h), partner_duties(snapshot, h),
                                        -(snapshot.hosts[h].memory_mib - snapshot.used_memory(h)), h))


def choose_partner(snapshot: PoolSnapshot, spec: VmSpec, primary: str) -> str | None:
    candidates = partner_candidates(snapshot, spec, primary)
    return candidates[0] if candidates else None


def claim_plan(snapshot: PoolSnapshot, view: VmView, me: str, now: float) -> Copies | None:
    """The copies record `me`'s claim of a level 2/3 VM writes (None: a level without
    copies): every other copy stops being current, and a partner is named if none is.
    A forced start (`vm start --force-host`), an import (`--disk` given) and the target of a
    live migration's handover each write their own (core/replication.py, `claim_copies`)."""
    if not view.spec.level.has_copies:
        return None
    return claim_copies(view.copies, me, view.home, choose_partner(snapshot, view.spec, me), now,
                        forced=view.force_host == me, imported=any(d.path for d in view.spec.disks),
                        migrated=view.handover_host == me)


def partner_with_room(snapshot: PoolSnapshot, spec: VmSpec, primary: str) -> tuple[str | None, str]:
    """A partner that could also take the VM over, or None and why not (for refusals)."""
    candidates = partner_candidates(snapshot, spec, primary)
    if not candidates:
        return None, "no other live host (out of maintenance, with a replication address) to keep the copy"
    best = candidates[0]
    info = snapshot.hosts[best]
    mem, cpus = failover_reserve(snapshot, best, primary, exclude=spec.name)
    used = snapshot.used_memory(best, exclude=spec.name)
    if (used + mem + spec.memory_mib > info.memory_mib
            or snapshot.used_vcpus(best) + cpus + spec.vcpus > info.vcpus):
        return None, (f"no partner has room to take the VM over: {best} has "
                      f"{info.memory_mib - used - mem} MiB free after its failover reserve, "
                      f"{spec.memory_mib} MiB needed")
    return best, f"partner {best}"


def overcommit_problem(snapshot: PoolSnapshot, spec: VmSpec) -> str | None:
    """Why starting `spec` now would overcommit the pool (None: it fits). Counts the VMs
    already asked to run but not placed yet; levels 2-3 also need a partner with room to
    take the VM over."""
    from .model import Desired
    hosts = [h for h in sorted(snapshot.hosts) if h not in snapshot.maintenance]
    pending = [v.spec for v in snapshot.vms.values()
               if v.spec.desired is Desired.RUNNING and v.owner is None and v.spec.name != spec.name]
    free_mem = sum(snapshot.hosts[h].memory_mib - snapshot.used_memory(h) for h in hosts)
    need = spec.memory_mib + sum(p.memory_mib for p in pending)
    fits = [h for h in hosts if snapshot.has_room(h, spec)]
    if not fits or free_mem < need:
        free = ", ".join(f"{h} {snapshot.hosts[h].memory_mib - snapshot.used_memory(h)} MiB/"
                         f"{snapshot.hosts[h].vcpus - snapshot.used_vcpus(h)} vCPU" for h in hosts) or "no host"
        waiting = f"; {len(pending)} VM(s) already waiting for room" if pending else ""
        return (f"overcommit: {spec.name} needs {spec.memory_mib} MiB / {spec.vcpus} vCPU and no live host has "
                f"that free (free: {free}{waiting}); stop or move a VM, or add a host")
    if spec.level.has_copies:
        primary = spec.preferred_host if spec.preferred_host in fits else max(
            fits, key=lambda h: snapshot.hosts[h].memory_mib - snapshot.used_memory(h))
        partner, why = partner_with_room(snapshot, spec, primary)
        if partner is None:
            return f"overcommit: {spec.name} on {primary} would be unprotected: {why}"
    return None


def migration_problem(snap: PoolSnapshot, view: VmView, target: str) -> str | None:
    """Why `view` cannot move live to `target` now (None: it can).
    Level 2 moves only to a host whose copy of the disks is current (its partner): the
    target runs on that copy and the old host's copy becomes the replica, so the disks
    never travel and the VM is protected again as soon as the few blocks written since
    the move are resynced. Level 3 moves only to its partner, whose replica must be in
    step (checkpoints acknowledged): a planned switchover from a final checkpoint."""
    spec = view.spec
    if view.owner is None or view.status is None or view.status.state is not RunState.RUNNING:
        return f"VM {spec.name} is not running"
    if view.migration is not None:
        return f"VM {spec.name} is already migrating to {view.migration.to}"
    if view.level_change is not None:
        return f"VM {spec.name} is changing to level {view.level_change.level}: move it afterwards"
    if target == view.owner.host:
        return f"VM {spec.name} already runs on {target}"
    host = snap.hosts.get(target)
    if host is None:
        return Problem(f"host {target} is not a live host of the pool", NOT_FOUND)
    if target in snap.maintenance:
        return f"host {target} is in maintenance"
    if not host.replication_addr:
        return f"host {target} has no replication_addr to receive migrations on"
    if spec.level.has_copies:
        ok, why = may_start_on(view.copies, target)
        if not ok:
            holders = ", ".join(view.copies.current_hosts()) if view.copies else "none"
            return (f"a level {int(spec.level)} VM moves live only to a host with a current copy "
                    f"(current: {holders}); {why}")
        if spec.level is Level.SYSTEM and (view.checkpoints is None or view.checkpoints.state != "protected"
                                           or view.checkpoints.partner != target):
            state = view.checkpoints.state if view.checkpoints else "no figures yet"
            return f"the level 3 replica on {target} is not in step ({state}): wait until the VM is protected"
    elif not host.can_reach(spec):
        return f"host {target} cannot reach the VM's disks (they must be on storage both hosts share)"
    if not snap.has_room(target, spec):
        return f"host {target} has no room for {spec.memory_mib} MiB / {spec.vcpus} vCPU"
    return None


def raise_to_system_problem(snap: PoolSnapshot, spec: VmSpec, owner: str) -> str | None:
    """Why a running VM cannot be raised to level 3 on `owner` now (None: it can), as far as
    memory goes. It moves live into a second QEMU on the same host whose RAM is a shared
    file: until the old QEMU exits the host holds the guest's RAM twice."""
    info = snap.hosts.get(owner)
    if info is None:
        return f"host {owner} is not a live host of the pool"
    free = info.memory_mib - snap.used_memory(owner)
    if free < spec.memory_mib:
        return (f"the VM moves live into a second QEMU on {owner}, which holds the guest's RAM twice "
                f"until the move ends: {spec.memory_mib} MiB more needed, {owner} has {free} MiB free")
    return None


def plan_evacuation(snap: PoolSnapshot, host: str) -> tuple[dict[str, str], list[str]]:
    """Where each VM running on `host` would go (most free memory first, room counted as
    VMs are placed), and the reasons for those that cannot move."""
    from .decide import eligible_hosts  # (decide imports this module)
    planned: dict[str, str] = {}
    extra: dict[str, int] = {}
    problems = []
    for name, view in sorted(snap.vms.items()):
        if view.owner is None or view.owner.host != host:
            continue
        candidates = [h for h in eligible_hosts(snap, view) if h != host]
        candidates.sort(key=lambda h: -(snap.hosts[h].memory_mib - snap.used_memory(h, name) - extra.get(h, 0)))
        fits = [h for h in candidates if snap.hosts[h].memory_mib - snap.used_memory(h, name) - extra.get(h, 0)
                >= view.spec.memory_mib and migration_problem(snap, view, h) is None]
        if not fits:
            others = candidates or sorted(h for h in snap.hosts if h != host)
            why = migration_problem(snap, view, others[0]) if others else "no other host is up"
            problems.append(f"{name}: {why}")
            continue
        planned[name] = fits[0]
        extra[fits[0]] = extra.get(fits[0], 0) + view.spec.memory_mib
    return planned, problems
