"""Is a VM protected right now? Always answered with a reason when it is not."""

from __future__ import annotations

from dataclasses import dataclass, replace

import time

from .model import CheckpointFigures, Desired, Level, PoolSnapshot, RunState, VmView
from .replication import CopyState
from .sites import site_caveat


@dataclass(frozen=True)
class Protection:
    protected: bool
    reason: str
    site_caveat: str = ""  # protected against a host's loss, but not its site's: why (core/sites.py)
    degraded: str = ""     # protected, but checkpoints wait for a link slower than the guest (level 3)

    def __str__(self) -> str:
        if not self.protected:
            return f"Not protected: {self.reason}"
        notes = "; ".join(n for n in (self.degraded, self.site_caveat) if n)
        return f"Protected ({notes})" if notes else "Protected"


def protection(snapshot: PoolSnapshot, view: VmView) -> Protection:
    """Whether the VM survives the loss of its host now, and, in a pool with sites, of its site."""
    p = _protection(snapshot, view)
    if not p.protected:
        return p
    restart_hosts = (_spares(snapshot, view, view.owner.host)
                     if view.owner is not None and view.spec.level is Level.RESTART else [])
    return replace(p, site_caveat=site_caveat(snapshot, view, restart_hosts))


def _spares(snapshot: PoolSnapshot, view: VmView, here: str) -> list[str]:
    """Level 1: the other hosts that could restart the VM (its shared storage, room)."""
    return [h for h, info in snapshot.hosts.items()
            if h != here and info.can_reach(view.spec) and snapshot.has_room(h, view.spec)]


def _protection(snapshot: PoolSnapshot, view: VmView) -> Protection:
    spec = view.spec
    if spec.level is Level.UNPROTECTED:
        return Protection(False, "level 0 (unprotected)")
    if spec.desired is Desired.STOPPED:
        return Protection(False, "stopped")
    if view.guest is not None and view.guest.gave_up:
        return Protection(False, view.guest.gave_up)
    if view.owner is None or view.status is None or view.status.state is not RunState.RUNNING:
        return Protection(False, "not running")
    here = view.owner.host
    if spec.level is Level.COMPONENT:
        return _component(snapshot, view, here)
    if spec.level is Level.SYSTEM:
        return _system(snapshot, view, here)
    host = snapshot.hosts.get(here)
    if host is None or not host.can_reach(spec):
        return Protection(False, "disks are not on shared storage")
    spares = _spares(snapshot, view, here)
    if not spares:
        others = [h for h in snapshot.hosts if h != here]
        if not others:
            return Protection(False, "no other live host")
        return Protection(False, "no other live host has room and its shared storage")
    return Protection(True, f"restarts on {spares[0]} if {here} is lost")


def replica_text(view: VmView) -> str:
    """The partner copy's state in words: in sync / syncing N% (ETA) / outdated since ..."""
    copies, here = view.copies, view.owner.host if view.owner else view.home
    if not view.spec.level.has_copies or copies is None or here is None:
        return ""
    partner = copies.partner_of(here)
    if partner is None:
        return "no partner"
    c = copies.copies[partner]
    if c.state is CopyState.CURRENT:
        return "in sync"
    if c.state is CopyState.SYNCING:
        if view.checkpoints is not None and view.checkpoints.state == "syncing":
            return f"syncing {100 * view.checkpoints.sync_done:.0f}% (pre-copy while the guest runs)"
        sync = view.sync
        if sync is not None and sync.total:
            eta = sync.eta()
            return (f"syncing {100 * sync.done // sync.total}%"
                    + (f" (ETA {eta:.0f} s)" if eta is not None else ""))
        return "syncing"
    stamp = time.strftime("%H:%M:%S", time.localtime(c.since))
    return f"{c.state.value} since {stamp}"


def _system(snapshot: PoolSnapshot, view: VmView, here: str) -> Protection:
    """Level 3: protected while the partner's replica is current (recorded in etcd) and the
    engine reports it checkpointing with acknowledgements."""
    copies, figures = view.copies, view.checkpoints
    partner = copies.partner_of(here) if copies else None
    if copies is None or partner is None:
        return Protection(False, "no partner host holds a replica")
    theirs = copies.copies[partner]
    if partner not in snapshot.hosts:
        return Protection(False, f"partner {partner} is down; replica {theirs.state.value} ({theirs.reason})")
    if figures is None or figures.partner != partner:  # none yet, or another owner's (before a move)
        return Protection(False, "checkpointing has not started")
    if figures.state == "syncing":
        return Protection(False, f"first copy to {partner} under way ({100 * figures.sync_done:.0f}%)")
    if theirs.state is not CopyState.CURRENT or figures.state != "protected":
        return Protection(False, figures.reason or f"replica on {partner} {theirs.state.value} ({theirs.reason})")
    trigger = " and on output" if view.spec.checkpoint_on_output else ""
    packed = f", compressed {figures.raw_bytes_per_s / figures.link_bytes_per_s:.1f}:1" if (
        figures.compressed and figures.link_bytes_per_s) else ""
    return Protection(True, f"checkpointed to {partner} every {view.spec.checkpoint_ms} ms{trigger} "
                            f"({figures.per_s:.1f}/s, pause p50 {figures.pause_p50_ms:.0f}/p99 "
                            f"{figures.pause_p99_ms:.0f} ms, {figures.dirty_pages_p50:.0f} dirty pages, "
                            f"{figures.link_bytes_per_s / 2**20:.1f} MiB/s{packed})",
                      degraded=link_bound(figures, partner))


LINK_BOUND_ABOVE = 0.25  # share of the last 10 s spent waiting for the link before status says so


def link_bound(figures: CheckpointFigures, partner: str) -> str:
    """Level 3 degrades on a link slower than the guest dirties memory: checkpoints wait for
    acknowledgements before they begin (l3/primary.py), so they come further apart, each
    carrying more, and output waits longer. Still protected: every released output's
    checkpoint is on the partner."""
    if figures.link_bound < LINK_BOUND_ABOVE:
        return ""
    apart = f"{1000 / figures.per_s:.0f} ms apart" if figures.per_s else "further apart"
    return (f"degraded: the link to {partner} is slower than the guest writes memory "
            f"({figures.link_bytes_per_s / 2**20:.1f} MiB/s sent); checkpoints waited for it "
            f"{100 * figures.link_bound:.0f}% of the last 10 s and come {apart}; output waits longer")


def _component(snapshot: PoolSnapshot, view: VmView, here: str) -> Protection:
    copies = view.copies
    if copies is None:
        return Protection(False, "no copies recorded yet")
    partner = copies.partner_of(here)
    if partner is None:
        return Protection(False, "no partner host holds a copy")
    mine, theirs = copies.copies.get(here), copies.copies[partner]
    if mine is not None and mine.state is CopyState.FAILED:
        return Protection(False, f"local disk on {here} failed; running on the copy on {partner}")
    if partner not in snapshot.hosts:
        return Protection(False, f"partner {partner} is down; replica {replica_text(view)}")
    if theirs.state is CopyState.CURRENT:
        if not any(e.host == partner for e in view.exports):
            return Protection(False, f"partner {partner} is not serving its copy")
        down, up = snapshot.a_links_down(here, partner)
        if down:
            return Protection(False, f"A-link {', '.join(down)} from {here} to {partner} down; "
                                     f"replicating over {', '.join(up) or 'nothing'}")
        return Protection(True, f"every write on {here} and {partner}")
    return Protection(False, f"replica on {partner} {replica_text(view)} ({theirs.reason})")
