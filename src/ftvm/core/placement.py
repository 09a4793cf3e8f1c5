"""Where a VM's partner copy goes (levels 2 and 3), and when a lost partner is replaced (pure).

With 3 or 4 hosts the partner is chosen so that one host's loss leaves every VM a
place to go: a partner must have room for the VM *on top of* what it would already
take over if the same primary were lost (the failover reserve), and among those the
host that is partner to the fewest VMs comes first (spreading the duty), then the
one with most free memory, then by name (every agent computes the same answer).
"""

from __future__ import annotations

from .model import PoolSnapshot, VmSpec


def partner_duties(snapshot: PoolSnapshot, host: str) -> int:
    """How many VMs running elsewhere keep a copy on `host`."""
    return sum(1 for v in snapshot.vms.values()
               if v.copies is not None and host in v.copies.copies and v.owner is not None
               and v.owner.host != host)


def failover_reserve(snapshot: PoolSnapshot, host: str, primary: str, exclude: str = "") -> tuple[int, int]:
    """Memory (MiB) and vCPUs `host` would have to take over if `primary` were lost: the
    VMs running on `primary` whose partner is `host`."""
    mem = cpus = 0
    for name, v in snapshot.vms.items():
        if name == exclude or v.owner is None or v.owner.host != primary or v.copies is None:
            continue
        if v.copies.partner_of(primary) == host:
            mem += v.spec.memory_mib
            cpus += v.spec.vcpus
    return mem, cpus


def partner_candidates(snapshot: PoolSnapshot, spec: VmSpec, primary: str) -> list[str]:
    """Live hosts that could keep `spec`'s copy while it runs on `primary`, best first."""
    def room(h: str) -> bool:
        info = snapshot.hosts[h]
        mem, cpus = failover_reserve(snapshot, h, primary, exclude=spec.name)
        return (snapshot.used_memory(h) + mem + spec.memory_mib <= info.memory_mib
                and snapshot.used_vcpus(h) + cpus + spec.vcpus <= info.vcpus)

    hosts = [h for h in snapshot.hosts
             if h != primary and h not in snapshot.maintenance and snapshot.hosts[h].replication_addr]
    return sorted(hosts, key=lambda h: (not room(h), partner_duties(snapshot, h),
                                        -(snapshot.hosts[h].memory_mib - snapshot.used_memory(h)), h))


def choose_partner(snapshot: PoolSnapshot, spec: VmSpec, primary: str) -> str | None:
    candidates = partner_candidates(snapshot, spec, primary)
    return candidates[0] if candidates else None


def partner_with_room(snapshot: PoolSnapshot, spec: VmSpec, primary: str) -> tuple[str | None, str]:
    """A partner that could also take the VM over, or None and why not (for refusals)."""
    candidates = partner_candidates(snapshot, spec, primary)
    if not candidates:
        return None, "no other live host (out of maintenance, with a replication address) to keep the copy"
    best = candidates[0]
    info = snapshot.hosts[best]
    mem, cpus = failover_reserve(snapshot, best, primary, exclude=spec.name)
    if (snapshot.used_memory(best) + mem + spec.memory_mib > info.memory_mib
            or snapshot.used_vcpus(best) + cpus + spec.vcpus > info.vcpus):
        return None, (f"no partner has room to take the VM over: {best} has "
                      f"{info.memory_mib - snapshot.used_memory(best) - mem} MiB free after its failover reserve, "
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
