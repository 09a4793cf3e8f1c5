"""Pool operations shared by the CLI and the REST API: check, then change the store.

Each either does what was asked or raises `FtvmError` with the reason and changes
nothing. Waiting for the agents to act on a change is the caller's business.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .core.availability import Report, report
from .core.model import Desired, Level, PoolSnapshot, VmSpec, VmView
from .core.validate import check_new_vm
from .errors import BAD_INPUT, NOT_FOUND, REFUSED, FtvmError
from .store.pool import PoolStore


async def get_view(store: PoolStore, name: str) -> tuple[PoolSnapshot, VmView]:
    snap = await store.snapshot()
    if name not in snap.vms:
        raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
    return snap, snap.vms[name]


async def define(store: PoolStore, spec: VmSpec) -> None:
    snap = await store.snapshot()
    problem = check_new_vm(spec, snap, os.path.isfile)
    if problem:
        raise FtvmError(problem, REFUSED if "already" in problem else BAD_INPUT)
    if not await store.define_vm(spec):
        raise FtvmError(f"VM {spec.name} already exists", REFUSED)


async def set_desired(store: PoolStore, name: str, desired: Desired) -> bool:
    """Returns whether anything changed."""
    while True:
        got = await store.spec(name)
        if got is None:
            raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
        spec, rev = got
        if spec.desired is desired:
            return False
        if await store.update_spec(replace(spec, desired=desired), rev):
            return True


async def remove(store: PoolStore, name: str) -> None:
    _, view = await get_view(store, name)
    if view.owner is not None or view.spec.desired is Desired.RUNNING:
        raise FtvmError(f"VM {name} is not stopped: stop it first (`ftvm vm stop {name} --wait`)", REFUSED)
    got = await store.spec(name)
    if got is None or not await store.remove_vm(name, got[1]):
        raise FtvmError(f"VM {name} changed while being removed; nothing removed", REFUSED)


async def set_sla(store: PoolStore, name: str, percent: float | None) -> VmSpec:
    """The availability target reports compare with (None: no target)."""
    if percent is not None and not 0 < percent <= 100:
        raise FtvmError(f"SLA target {percent}% must be above 0 and at most 100", BAD_INPUT)
    while True:
        got = await store.spec(name)
        if got is None:
            raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
        spec, rev = got
        new = replace(spec, sla_percent=percent)
        if await store.update_spec(new, rev):
            return new


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
        out.append(report(name, history.get(name, []), start, end, sla))
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
