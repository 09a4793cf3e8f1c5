"""The pool as plain data (pure): what `ftvm status -o json`, the REST API and the
dashboard show. One place, so every front end says the same thing."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

from .core.decide import choose_host
from .core.dr_points import lag_s
from .core.model import Desired, FrozenVm, PoolSnapshot, RunState, VmView
from .core.protection import protection, replica_text


class VmRow(TypedDict):
    """One VM as every front end shows it (JSON: `status -o json`, GET /api/v1/vms)."""
    name: str
    level: int | None
    host: str | None
    state: str                     # a RunState value, "pending", "stopped" or "unknown" (frozen)
    partner: str | None
    replica: str | None
    copies: dict[str, Any] | None
    sync: dict[str, Any] | None
    checkpoints: dict[str, Any] | None
    desired: str | None
    protected: bool
    protection: str                # "Protected", "Protected (<site caveat>)" or "Not protected: <reason>"
    site_caveat: NotRequired[str]  # protected against a host's loss but not its site's: why (core/sites.py)
    detail: str
    memory_mib: int
    vcpus: int
    macs: list[str]
    home: str | None
    migration: dict[str, Any] | None
    level_change: dict[str, Any] | None
    preferred_host: str | None
    failback: bool
    cannot_start: str | None
    frozen: NotRequired[bool]      # a record of it cannot be read
    spec: NotRequired[dict[str, Any]]          # vm_detail only
    status: NotRequired[dict[str, Any] | None]
    fencing_token: NotRequired[int | None]
    guest: NotRequired[dict[str, Any] | None]  # vm_detail: its own failures (core/guest_failures.py)
    dr: NotRequired[dict[str, Any] | None]     # DR replication (dr_row), for a VM with a DR target


class HostRow(TypedDict):
    name: str
    state: str                     # "up", "maintenance" or "down"
    memory_mib: int
    memory_used_mib: int
    vcpus: int
    vcpus_used: int
    shared_storage: list[str]
    vms: list[str]
    site: NotRequired[str]              # where it stands (host.toml `site`), "" none
    copies_of: NotRequired[list[str]]   # a host that is down: the VMs it holds a copy of


def vm_row(snap: PoolSnapshot, view: VmView) -> VmRow:
    st = view.status
    prot = protection(snap, view)
    where = view.owner.host if view.owner else None
    if st is not None:
        state = st.state.value
    elif view.spec.desired is Desired.RUNNING:
        state = "pending"
    else:
        state = "stopped"
    waiting = cannot_start = None
    if view.owner is None and view.spec.desired is Desired.RUNNING:
        target, waiting = choose_host(snap, view)
        cannot_start = waiting if target is None else None
    here = where or view.home
    partner = view.copies.partner_of(here) if view.copies and here else None
    return {"name": view.spec.name, "level": int(view.spec.level), "host": where, "state": state,
            "partner": partner, "replica": replica_text(view),
            "copies": view.copies.to_json() if view.copies else None,
            "sync": view.sync.__dict__ if view.sync else None,
            "checkpoints": view.checkpoints.__dict__ if view.checkpoints else None,
            "desired": view.spec.desired.value, "protected": prot.protected,
            "protection": str(prot), "detail": (st.detail if st else waiting) or "",
            "memory_mib": view.spec.memory_mib, "vcpus": view.spec.vcpus,
            "macs": [n.mac for n in view.spec.nics], "home": view.home,
            "migration": _move(view), "level_change": _level_change(view),
            "preferred_host": view.spec.preferred_host, "failback": view.spec.failback,
            "cannot_start": cannot_start, "site_caveat": prot.site_caveat, "dr": dr_row(view, time.time())}


def dr_row(view: VmView, now: float) -> dict[str, Any] | None:
    """A VM's DR replication as front ends show it: the lag against its RPO (core/dr_points.py)."""
    spec, f = view.spec, view.dr
    if not spec.dr_target:
        return None
    running = view.owner is not None
    lag = lag_s(f.newest_taken_at if f and f.newest else None, now, f.since if f else now) if running else None
    return {"target": spec.dr_target, "rpo_s": spec.dr_rpo_s, "lag_s": None if lag is None else round(lag, 1),
            "within_rpo": lag is not None and lag <= spec.dr_rpo_s,
            "newest": f.newest if f else 0, "newest_taken_at": f.newest_taken_at if f else 0.0,
            "kind": f.kind if f else "", "data_bytes": f.data_bytes if f else 0, "wire_bytes": f.wire_bytes if f else 0,
            "sent_bytes": f.sent_bytes if f else 0, "written_bytes": f.written_bytes if f else 0,
            "receiver": f.receiver if f else "", "error": f.error if f else ""}


def frozen_row(frozen: FrozenVm) -> VmRow:
    """A VM one of whose records cannot be read: the same keys as `vm_row`, what is known."""
    return {"name": frozen.name, "level": None, "host": None, "state": "unknown", "partner": None,
            "replica": None, "copies": None, "sync": None, "checkpoints": None, "desired": None,
            "protected": False, "protection": f"Not protected: {frozen.reason}", "detail":
            f"nothing is done to it until {frozen.problem.key} is fixed", "memory_mib": 0, "vcpus": 0,
            "macs": [], "home": None, "migration": None, "level_change": None, "preferred_host": None,
            "failback": False, "cannot_start": frozen.reason, "frozen": True}


def vm_rows(snap: PoolSnapshot) -> list[VmRow]:
    """Every VM, by name; frozen ones (unreadable records) included."""
    rows = {n: vm_row(snap, v) for n, v in snap.vms.items() if n not in snap.frozen}
    rows |= {n: frozen_row(f) for n, f in snap.frozen.items()}
    return [rows[n] for n in sorted(rows)]


def vm_detail(snap: PoolSnapshot, view: VmView) -> VmRow:
    """One VM in full (`vm show`, GET /vms/{name})."""
    row = vm_row(snap, view)
    row["spec"] = view.spec.to_json()
    row["status"] = view.status.to_json() if view.status else None
    row["fencing_token"] = view.owner.token if view.owner else None
    row["guest"] = view.guest.to_json() if view.guest else None  # its own failures (panic, watchdog, probe)
    return row


def _move(view: VmView) -> dict[str, Any] | None:
    m = view.migration
    if m is None:
        return None
    return {"to": m.to, "from": m.source, "phase": m.phase,
            "fraction": round(m.done / m.total, 3) if m.total else 0.0}


def _level_change(view: VmView) -> dict[str, Any] | None:
    c = view.level_change
    if c is None:
        return None
    return {"to": c.level, "from": int(view.spec.level), "phase": c.phase,
            "fraction": round(c.done / c.total, 3) if c.total else 0.0}


def host_rows(snap: PoolSnapshot) -> list[HostRow]:
    """Live hosts ("up" or "maintenance"), then hosts the pool still refers to (a VM's last
    host, a copy, a preferred host, maintenance) that are not live: "down"."""
    rows: list[HostRow] = [{"name": h.name, "state": "maintenance" if h.name in snap.maintenance else "up",
             "memory_mib": h.memory_mib, "memory_used_mib": snap.used_memory(h.name), "vcpus": h.vcpus,
             "vcpus_used": snap.used_vcpus(h.name), "shared_storage": list(h.shared_storage),
             "vms": sorted(v.spec.name for v in snap.vms.values() if v.owner and v.owner.host == h.name),
             "site": h.site}
            for h in sorted(snap.hosts.values(), key=lambda h: h.name)]
    known: set[str] = set(snap.maintenance)
    for v in snap.vms.values():
        known.update(h for h in (v.home, v.spec.preferred_host) if h)
        if v.copies:
            known.update(v.copies.copies)
    for name in sorted(known - set(snap.hosts)):
        copies = sorted(v.spec.name for v in snap.vms.values() if v.copies and name in v.copies.copies)
        rows.append({"name": name, "state": "down", "memory_mib": 0, "memory_used_mib": 0, "vcpus": 0,
                     "vcpus_used": 0, "shared_storage": [], "vms": [], "copies_of": copies})
    return rows


def status_data(snap: PoolSnapshot, urls: list[str], pool: str) -> dict[str, Any]:
    return {"pool": pool, "quorum": {"reachable": True, "endpoints": urls, "revision": snap.revision},
            "hosts": host_rows(snap),
            "vms": vm_rows(snap)}


def row_of(snap: PoolSnapshot, vm: str) -> VmRow | None:
    if vm in snap.frozen:
        return frozen_row(snap.frozen[vm])
    view = snap.vms.get(vm)
    return vm_row(snap, view) if view is not None else None


def runs_on(snap: PoolSnapshot, vm: str, host: str) -> bool:
    """The VM is owned by `host` and reported running there."""
    view = snap.vms.get(vm)
    return (view is not None and view.owner is not None and view.owner.host == host
            and view.status is not None and view.status.state is RunState.RUNNING)


def move_progress(row: Mapping[str, Any] | None, target: str) -> tuple[str, float]:
    """A live migration to `target`, from the VM's row (`vm_row`, or the API's): "arrived",
    "moving" or "failed" (the VM is gone, or the migration ended with the VM elsewhere),
    and the share of its RAM sent so far."""
    if row is None:
        return "failed", 0.0
    if row["host"] == target and row["state"] == RunState.RUNNING.value:
        return "arrived", 1.0
    m = row.get("migration")
    if m is None and row["host"] is not None and row["host"] != target:
        return "failed", 0.0
    return "moving", (float(m["fraction"]) if m else 0.0)


def level_progress(row: Mapping[str, Any] | None, level: int) -> tuple[str, float, str]:
    """An online level change to `level`, from the VM's row: ("changing" | "protecting" |
    "done" | "failed", share done 0..1, what is happening). Raising to 2 is done when the
    partner's copy is in sync (Protected); the disks' copy is the first half."""
    if row is None:
        return "failed", 0.0, "VM removed"
    change = row.get("level_change")
    if change is not None:
        return ("changing", (0.5 if level >= 2 else 0.9) * float(change["fraction"]),
                f"level {change['from']} -> {level}: {change['phase']}")
    if row["level"] != level:
        return "failed", 0.0, "the change was abandoned (see the events)"
    if level < 2:
        return "done", 1.0, f"level {level}"
    if row["protected"]:
        return "done", 1.0, f"level {level}, Protected"
    sync, ckpt = row.get("sync"), row.get("checkpoints")
    frac = (sync["done"] / sync["total"] if sync and sync["total"]
            else float(ckpt.get("sync_done", 0.0)) if ckpt else 0.0)
    return "protecting", 0.5 + 0.5 * frac, f"level {level}, building the replica ({row['protection']})"
