"""Which online level change moves a running VM from one protection level to another (pure).

  0/1 -> 2   RAISE_TO_COMPONENT   disks mirrored to this host's copy, then replicated
  2 -> 0/1   LOWER_FROM_COMPONENT replica released (to 1: disks mirrored to shared images)
  0/1/2 -> 3 RAISE_TO_SYSTEM      the VM moves live into a checkpointed QEMU on this host
  3 -> 0/1/2 LOWER_FROM_SYSTEM    checkpointing ends (to 2: then as RAISE_TO_COMPONENT)

Level 0 <-> 1 has no transition while running (the disks would have to move between shared
and local storage and nothing would protect them meanwhile): stop the VM first. The
steps of each are in agent/levels.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from ..errors import BAD_INPUT, REFUSED, Problem
from .model import Desired, Level, PoolSnapshot, RunState, VmSpec, VmView
from .placement import partner_with_room, raise_to_system_problem


class Transition(str, Enum):
    RAISE_TO_COMPONENT = "raise to level 2"
    LOWER_FROM_COMPONENT = "lower from level 2"
    RAISE_TO_SYSTEM = "raise to level 3"
    LOWER_FROM_SYSTEM = "lower from level 3"


def transition(current: Level, wanted: Level) -> Transition | None:
    """The online change from `current` to `wanted`, None if there is none."""
    if current == wanted:
        return None
    if wanted is Level.SYSTEM:
        return Transition.RAISE_TO_SYSTEM
    if current is Level.SYSTEM:
        return Transition.LOWER_FROM_SYSTEM
    if wanted is Level.COMPONENT:
        return Transition.RAISE_TO_COMPONENT
    if current is Level.COMPONENT:
        return Transition.LOWER_FROM_COMPONENT
    return None


ONLINE_LEVEL_CHANGE_3 = ("level 3 changes are made on a running VM (it moves live into, or out of, a "
                         "checkpointed QEMU): start it first, or add a new level 3 VM")


class How(str, Enum):
    NOTHING = "already at that level"
    STOPPED = "a stopped VM: its spec changes"
    SPEC = "levels 0 and 1: only the spec changes, the disks stay"
    ONLINE = "the owner's agent changes it while it runs"


@dataclass(frozen=True)
class LevelPlan:
    how: How
    spec: VmSpec                   # How.SPEC: the spec to write
    disk_paths: tuple[str, ...] = ()  # How.ONLINE to level 1: the shared images the disks move to


def plan_level_change(snap: PoolSnapshot, view: VmView, spec: VmSpec, level: Level, disk_paths: tuple[str, ...],
                      overwrite: bool, exists: Callable[[str], bool]) -> LevelPlan | Problem:
    """How `spec`'s VM (as `view` shows it) goes to `level`, or why it may not: the
    admission rules of `vm set --level`, checked before anything is written.
    `exists`: whether a file exists (an image the move to level 1 would replace)."""
    old = spec.level
    if level == old:
        return LevelPlan(How.NOTHING, spec)
    stopped = view.owner is None and spec.desired is Desired.STOPPED
    if Level.SYSTEM in (old, level) and stopped:
        return Problem(ONLINE_LEVEL_CHANGE_3, REFUSED)
    if stopped:
        return LevelPlan(How.STOPPED, spec)
    name = spec.name
    if view.owner is None or view.status is None or view.status.state is not RunState.RUNNING:
        return Problem(f"VM {name} is starting or stopping: change its level once it runs (or is stopped)", REFUSED)
    if view.migration is not None:
        return Problem(f"VM {name} is migrating to {view.migration.to}: change its level afterwards", REFUSED)
    if view.level_change is not None:
        return Problem(f"VM {name} is already changing to level {view.level_change.level}", REFUSED)
    owner = view.owner.host
    if {old, level} <= {Level.UNPROTECTED, Level.RESTART}:  # the disks stay where they are
        new = replace(spec, level=level)
        if level is Level.RESTART and not any(h.name != owner and h.can_reach(new) for h in snap.hosts.values()):
            return Problem(f"level 1 restarts the VM on another host from shared storage, and no other live "
                           f"host reaches {', '.join(d.path for d in spec.disks)}", REFUSED)
        return LevelPlan(How.SPEC, new)
    if level.has_copies:
        partner, why = partner_with_room(snap, replace(spec, level=level), owner)
        if partner is None:
            return Problem(f"cannot raise {name} to level {int(level)}: {why}", REFUSED)
        problem = raise_to_system_problem(snap, spec, owner) if level is Level.SYSTEM else None
        if problem:
            return Problem(f"cannot raise {name} to level 3: {problem}", REFUSED)
    paths: tuple[str, ...] = ()
    if level is Level.RESTART:
        paths = disk_paths or tuple(d.path for d in spec.disks)
        if len(paths) != len(spec.disks) or not all(paths):
            return Problem(f"level 1 keeps the disks on shared storage: give one image path per disk "
                           f"({len(spec.disks)}) with --disk-path", BAD_INPUT)
        moved = replace(spec, level=Level.RESTART, disks=tuple(replace(d, path=p) for d, p in zip(
            spec.disks, paths, strict=True)))
        if not snap.hosts[owner].can_reach(moved):
            return Problem(f"{', '.join(paths)}: not on storage {owner} shares "
                           f"({', '.join(snap.hosts[owner].shared_storage) or 'none'})", BAD_INPUT)
        clobbered = [p for p in paths if exists(p) and p not in {d.path for d in spec.disks}]
        if clobbered and not overwrite:
            return Problem(f"{', '.join(clobbered)} already exists: give --overwrite to replace it (its contents "
                           "are lost), or another --disk-path; nothing changed", REFUSED)
    return LevelPlan(How.ONLINE, spec, paths)
