"""The level 2 owner's replica manager: what its loop does next (pure).

Each round (woken by a QEMU event, or every probe interval) the manager looks at the
guest's run state, how the disks are mirrored (`mode`), and the copies record and
exports as the last tick saw them, and does one step:

  guest stopped on an I/O error        -> IO_ERROR: find which copy failed, mask it
  paused, a copy drop left half done   -> FINISH_DROP
  mirrored                             -> WATCH_PARTNER (probe it; record it current
                                          first if the record still says otherwise)
  on the partner's copy only (local
  disk failed): operator replaced it   -> RECORD_REPAIR (this copy outdated, in full)
              this copy behind         -> RESYNC_LOCAL from the partner
  on the local copy only, the partner
  behind and exporting                 -> RESYNC_PARTNER (in full, or its changed blocks)
  otherwise                            -> NOTHING
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .model import Export
from .replication import Copies, CopyState, needs_full_resync

BEHIND = (CopyState.OUTDATED, CopyState.SYNCING, CopyState.FAILED)


class Step(str, Enum):
    IO_ERROR = "io-error"
    FINISH_DROP = "finish-drop"
    WATCH_PARTNER = "watch-partner"
    RECORD_REPAIR = "record-repair"
    RESYNC_LOCAL = "resync-local"
    RESYNC_PARTNER = "resync-partner"
    NOTHING = "nothing"


@dataclass(frozen=True)
class ReplicaStep:
    step: Step
    partner: str | None = None
    export: Export | None = None   # the partner's export, when it has one
    mark_current: bool = False     # WATCH_PARTNER: record the partner's copy current first
    full: bool = False             # RESYNC_PARTNER: all of it, not only the changed blocks


def next_step(status: str, mode: str, drop_pending: bool, copies: Copies | None, exports: tuple[Export, ...],
              me: str, repair_requested: bool) -> ReplicaStep:
    """`status`: QEMU's run state; `mode`: qemu.blockgraph.Mode's value (every disk the
    same, else "local-only")."""
    if status == "io-error":
        return ReplicaStep(Step.IO_ERROR)
    if status == "paused" and drop_pending:
        return ReplicaStep(Step.FINISH_DROP)
    partner = copies.partner_of(me) if copies else None
    export = next((e for e in exports if e.host == partner), None)
    if mode == "mirrored":
        c = copies.state_of(partner) if copies and partner else None
        stale = partner is not None and c is not None and c.state is not CopyState.CURRENT and status == "running"
        return ReplicaStep(Step.WATCH_PARTNER, partner, export, mark_current=stale)
    if status != "running" or copies is None:
        return ReplicaStep(Step.NOTHING)
    if mode == "remote-only":
        mine = copies.state_of(me)
        if mine is not None and mine.state is CopyState.FAILED and repair_requested:
            return ReplicaStep(Step.RECORD_REPAIR, partner, export)
        if mine is not None and mine.state in (CopyState.OUTDATED, CopyState.SYNCING) and partner and export:
            return ReplicaStep(Step.RESYNC_LOCAL, partner, export)
        return ReplicaStep(Step.NOTHING)
    c = copies.state_of(partner) if partner else None
    if partner is not None and export is not None and c is not None and c.state in BEHIND:
        # a failed copy comes back as storage that works again: resynced in full
        return ReplicaStep(Step.RESYNC_PARTNER, partner, export, full=needs_full_resync(c, export.fresh))
    return ReplicaStep(Step.NOTHING)
