"""The reconcile decision: pool snapshot + what this host runs -> what to do, and why.

Pure: no clock, no I/O. The agent executes the decisions; the event log, the
CLI and the tests read the same `TickReport`.

Level 0/1 state machine of one VM, seen from one host (docs/architecture.md):

    unowned --claim--> owned(me) --start--> running --stop--> stopped --release--> unowned
       ^                  |                   |
       |            owner lease expires   QEMU exits unasked -> start again
       +------------------+ (host lost: a survivor claims; level 0 waits for its home host)

Safety rules, checked before anything else:
  * a VM runs here only while this host owns it with the same fencing token;
  * otherwise it is killed at once, never stopped gracefully (never two copies);
  * a VM with a DR target is claimed only within `dr_confirm` of its DR site's last word
    that it has not taken the VM over (DR_CONFIRM asks it); one the DR site took over
    (spec.dr_failed_over) is never started (docs/dr.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .model import Desired, FrozenVm, Level, LocalView, PoolSnapshot, RunState, VmView
from .placement import choose_partner, migration_problem
from .replication import CopyState, may_start_on
from .sites import at_preferred_site, takeover_delay

ACTIVE_STATES = (RunState.STARTING, RunState.RUNNING, RunState.STOPPING)


class Action(str, Enum):
    CLAIM = "claim"      # take ownership in a transaction (fails if someone else won)
    START = "start"      # start QEMU under the fencing token
    STOP = "stop"        # graceful shutdown, then release
    RELEASE = "release"  # delete the owner key after QEMU is gone
    KILL = "kill"        # SIGKILL now: running without valid ownership
    EXPORT = "export"    # level 2 partner: serve this host's copy to the primary
    UNEXPORT = "unexport"  # level 2: stop serving it (the VM stopped, moved here, or is gone)
    PREPARE_INCOMING = "prepare-incoming"  # migration target: start a QEMU that waits for the VM
    MIGRATE = "migrate"  # migration source: send the running VM to the target, then hand it over
    CHANGE_LEVEL = "change-level"  # owner: raise or lower the running VM's protection level
    REPLACE_PARTNER = "replace-partner"  # owner: the partner is gone for good, build a replica elsewhere
    TAKE_OVER = "take-over"  # level 3 partner: the primary fell silent, carry on from the last checkpoint
    FAILBACK = "failback"  # owner: ask a live migration back to the VM's preferred host
    GUEST_FAILED = "guest-failed"  # owner: the guest failed on its own: restart it, or give up (the limit)
    DR_CONFIRM = "dr-confirm"  # would claim: first ask the DR site whether it has taken the VM over
    WAIT = "wait"        # nothing to do


@dataclass(frozen=True)
class Decision:
    vm: str
    action: Action
    reason: str
    token: int | None = None
    target: str | None = None  # REPLACE_PARTNER: the new partner host; FAILBACK: the preferred host
    failover: bool = False     # START: the VM comes up here after another host lost it (counted as such)

    def __str__(self) -> str:
        return f"{self.vm}: {self.action.value} ({self.reason})"


@dataclass(frozen=True)
class TickReport:
    host: str
    revision: int
    decisions: tuple[Decision, ...]

    def actions(self) -> list[Decision]:
        """The decisions that change something."""
        return [d for d in self.decisions if d.action is not Action.WAIT]

    def summary(self) -> str:
        acts = self.actions()
        if not acts:
            return f"{self.host}@{self.revision}: nothing to do"
        return f"{self.host}@{self.revision}: " + "; ".join(str(d) for d in acts)


def decide(snapshot: PoolSnapshot, local: LocalView, replace_partner_after: float = 60.0,
           takeover_after: float = 0.8, dr_confirm: float = 60.0) -> TickReport:
    """`replace_partner_after`: seconds a level 2/3 VM's partner may stay down (its copy
    outdated) before the owner builds a new replica on another host (`local.now`).
    `takeover_after`: seconds of silence after which a level 3 partner takes over.
    `dr_confirm`: how long the DR site's word that it has not taken a VM over lets it start."""
    me = local.host
    names = sorted(set(snapshot.vms) | set(local.vms) | set(snapshot.frozen))
    decisions = []
    for name in names:
        if name in snapshot.frozen:
            decisions.append(_decide_frozen(snapshot.frozen[name], local))
            continue
        view = snapshot.vms.get(name)
        if view is None:
            lv = local.vms[name]
            if lv.state in ACTIVE_STATES:
                decisions.append(Decision(name, Action.KILL, "VM no longer defined in the pool"))
            continue
        decisions.append(_decide_vm(snapshot, local, view, replace_partner_after, takeover_after, dr_confirm))
    for name in sorted((set(snapshot.vms) | local.exports) - set(snapshot.frozen)):
        export = _decide_export(snapshot, local, name)
        if export is not None:
            decisions.append(export)
    return TickReport(host=me, revision=snapshot.revision, decisions=tuple(decisions))


def _decide_frozen(frozen: FrozenVm, local: LocalView) -> Decision:
    """A record of the VM cannot be read: change nothing, except that the safety rule
    still holds (the owner key's token is readable even when its value is not)."""
    lv = local.vms.get(frozen.name)
    if lv is not None and lv.state in ACTIVE_STATES:
        if frozen.owner_token is None:
            return Decision(frozen.name, Action.KILL, "running here without ownership (lease lost)")
        if frozen.owner_token != lv.token:
            return Decision(frozen.name, Action.KILL,
                            f"fencing token {lv.token} is stale (owner token {frozen.owner_token})")
        return Decision(frozen.name, Action.WAIT, f"left running as it is: {frozen.reason}")
    return Decision(frozen.name, Action.WAIT, f"nothing done until fixed: {frozen.reason}")


def _decide_export(snapshot: PoolSnapshot, local: LocalView, name: str) -> Decision | None:
    """Level 2 partner duty: serve this host's copy while the VM runs on another host."""
    me, view = local.host, snapshot.vms.get(name)
    should = (view is not None and view.spec.level is Level.COMPONENT and view.copies is not None
              and me in view.copies.copies and view.owner is not None and view.owner.host != me
              and (name not in local.vms or local.vms[name].state not in ACTIVE_STATES))
    serving = name in local.exports
    if should and not serving:
        assert view is not None and view.owner is not None
        return Decision(name, Action.EXPORT, f"partner of {view.owner.host}: serving this host's copy")
    if serving and not should:
        why = ("VM removed" if view is None else "VM not running elsewhere" if view.owner is None
               or view.owner.host == me else "no longer a partner")
        return Decision(name, Action.UNEXPORT, why)
    return None


def may_take_over(snapshot: PoolSnapshot, view: VmView, local: LocalView, takeover_after: float) -> str | None:
    """Level 3 partner: why this host should take the VM over from its silent primary, or
    None. It keeps a committed checkpoint of the session now feeding it, its copy is
    recorded current, and the primary has sent nothing for `takeover_after` (twice that
    from a primary at the VM's preferred site: core/sites.py). The primary may only have
    lost the link: the takeover transaction then fails if it recorded this copy outdated
    first (store/pool.py), so this is a proposal, never the last word."""
    me, spec, owner = local.host, view.spec, view.owner
    standby = local.standbys.get(spec.name)
    if (spec.level is not Level.SYSTEM or spec.desired is not Desired.RUNNING or owner is None
            or owner.host == me or standby is None or standby.committed_epoch is None
            or standby.silent_s <= takeover_delay(snapshot, view, me, takeover_after)
            or view.copy_state(me) is not CopyState.CURRENT):
        return None
    return (f"{owner.host} silent for {standby.silent_s:.2f}s on the checkpoint link: "
            f"taking over from checkpoint {standby.committed_epoch}")


def dr_unconfirmed(view: VmView, now: float, dr_confirm: float) -> str | None:
    """Why a VM with a DR target may not be claimed yet, or None: its DR site must have said
    within `dr_confirm` that it has not taken the VM over (a site back from an outage long
    enough for a DR failover must ask first)."""
    spec, seen = view.spec, view.dr_confirmed
    if not spec.dr_target:
        return None
    if seen is None or seen.target != spec.dr_target:
        return f"asking DR target {spec.dr_target} whether it has taken the VM over (never asked)"
    age = now - seen.at
    if not -dr_confirm < age < dr_confirm:
        return (f"asking DR target {spec.dr_target} whether it has taken the VM over (last asked "
                f"{age:.0f} s ago, longer than {dr_confirm:g} s)")
    return None


def _decide_vm(snapshot: PoolSnapshot, local: LocalView, view: VmView, replace_partner_after: float,
               takeover_after: float, dr_confirm: float) -> Decision:
    me, spec, owner = local.host, view.spec, view.owner
    lv = local.vms.get(spec.name)
    running_here = lv is not None and lv.state in ACTIVE_STATES
    incoming_here = lv is not None and lv.state is RunState.INCOMING
    migration = view.migration

    if owner is None:
        handover = view.handover_host
        if running_here:
            if handover not in (None, me):
                return Decision(spec.name, Action.KILL, f"live migration handed the VM over to {handover}")
            return Decision(spec.name, Action.KILL, "running here without ownership (lease lost)")
        if handover == me:
            return Decision(spec.name, Action.CLAIM, "live migration handed the VM over to this host")
        if handover is not None and handover in snapshot.hosts:
            if incoming_here:
                return Decision(spec.name, Action.KILL, f"the migration went to {handover}")
            return Decision(spec.name, Action.WAIT, f"migrated to {handover}, which takes it over")
        if incoming_here:
            return Decision(spec.name, Action.KILL, "migration abandoned (no handover to this host)")
        if spec.dr_failed_over:
            return Decision(spec.name, Action.WAIT, f"{spec.dr_failed_over}: started only by a failback")
        if spec.desired is Desired.STOPPED:
            return Decision(spec.name, Action.WAIT, "stopped")
        if view.guest is not None and view.guest.gave_up:
            return Decision(spec.name, Action.WAIT, f"left stopped: {view.guest.gave_up}")
        target, why = choose_host(snapshot, view)
        if target == me:
            unconfirmed = dr_unconfirmed(view, local.now, dr_confirm)
            if unconfirmed is not None:
                return Decision(spec.name, Action.DR_CONFIRM, unconfirmed)
            return Decision(spec.name, Action.CLAIM, why)
        return Decision(spec.name, Action.WAIT, why)

    if owner.host != me:
        if running_here:
            return Decision(spec.name, Action.KILL, f"owned by {owner.host}: never two copies")
        takeover = may_take_over(snapshot, view, local, takeover_after)
        if takeover is not None:
            return Decision(spec.name, Action.TAKE_OVER, takeover, token=owner.token, failover=True)
        moving_here = migration is not None and migration.to == me and migration.source == owner.host
        if incoming_here:
            if moving_here:
                return Decision(spec.name, Action.WAIT, f"receiving the live migration from {owner.host}")
            return Decision(spec.name, Action.KILL, "migration abandoned")
        if moving_here and view.incoming is None:
            return Decision(spec.name, Action.PREPARE_INCOMING,
                            f"live migration from {owner.host} asked: preparing to receive it")
        return Decision(spec.name, Action.WAIT, f"runs on {owner.host}")

    # This host owns the VM.
    if running_here and lv is not None and lv.token != owner.token:
        return Decision(spec.name, Action.KILL,
                        f"fencing token {lv.token} is stale (owner token {owner.token})")
    if spec.desired is Desired.RUNNING and not spec.dr_failed_over:
        if running_here and lv is not None and lv.guest_failure is not None:
            return Decision(spec.name, Action.GUEST_FAILED, lv.guest_failure, token=owner.token)
        if not running_here and view.guest is not None and view.guest.gave_up:
            return Decision(spec.name, Action.RELEASE, f"left stopped: {view.guest.gave_up}", token=owner.token)
        if not running_here and lv is not None and lv.yielded:
            return Decision(spec.name, Action.RELEASE, f"stopped here: {lv.yielded}", token=owner.token)
        if running_here:
            if (migration is not None and migration.source == me and view.incoming is not None
                    and view.incoming.host == migration.to):
                return Decision(spec.name, Action.MIGRATE, f"live migration to {migration.to}",
                                token=owner.token)
            change = view.level_change
            if change is not None and change.token == owner.token and change.level != int(spec.level):
                return Decision(spec.name, Action.CHANGE_LEVEL,
                                f"level {int(spec.level)} -> {change.level} asked while running", token=owner.token)
            replacement = _partner_replacement(snapshot, view, me, local.now, replace_partner_after)
            if replacement is not None:
                return replacement
            home = spec.preferred_host
            if (spec.failback and home not in (None, me) and migration is None and view.level_change is None
                    and migration_problem(snapshot, view, home) is None):
                return Decision(spec.name, Action.FAILBACK, f"failback policy: {home} can run it again",
                                token=owner.token, target=home)
            return Decision(spec.name, Action.WAIT, "running")
        if incoming_here:
            return Decision(spec.name, Action.START, "migrated here: resuming the received VM",
                            token=owner.token)
        failover = False
        if lv is not None and lv.state is RunState.CRASHED and lv.token == owner.token:
            why = f"QEMU exited unasked (code {lv.exit_code}); starting again"
        elif view.home not in (None, me):
            why, failover = f"taking over from {view.home}", True
        else:
            why = "owned here, not running"
        return Decision(spec.name, Action.START, why, token=owner.token, failover=failover)
    if running_here and lv is not None:
        if lv.state is RunState.STOPPING:
            return Decision(spec.name, Action.WAIT, "stopping")
        return Decision(spec.name, Action.STOP, "desired state is stopped", token=owner.token)
    return Decision(spec.name, Action.RELEASE, "stopped; releasing ownership", token=owner.token)


def _partner_replacement(snapshot: PoolSnapshot, view: VmView, me: str, now: float,
                         after: float) -> Decision | None:
    """Level 2/3 owner: its partner host has been down for `after` seconds (its copy
    outdated since then) and another host could keep a copy: build a new replica there.
    A VM with no partner at all (first started while no other host was live: found by the
    simulator, sim/world.py) gets one as soon as a host can keep it."""
    copies = view.copies
    if not view.spec.level.has_copies or copies is None or not now:
        return None
    partner = copies.partner_of(me)
    if partner is None:
        new = choose_partner(snapshot, view.spec, me)
        return None if new is None else Decision(
            view.spec.name, Action.REPLACE_PARTNER, f"no partner: building a replica on {new}",
            token=view.owner.token if view.owner else None, target=new)
    c = copies.state_of(partner)
    if c is None or partner in snapshot.hosts or c.state is CopyState.CURRENT:
        return None
    if now - c.since < after:
        return None
    new = choose_partner(snapshot, view.spec, me)
    if new is None:
        return None
    return Decision(view.spec.name, Action.REPLACE_PARTNER,
                    f"partner {partner} down for {now - c.since:.0f}s: building a new replica on {new}",
                    token=view.owner.token if view.owner else None, target=new)


def eligible_hosts(snapshot: PoolSnapshot, view: VmView) -> list[str]:
    """Live hosts not in maintenance, with room, that can reach the VM's disks, best first
    (most free memory, then name, so every agent computes the same order).
    Level 2: only hosts holding a current copy (or the one an operator forced)."""
    spec = view.spec

    def reaches(h: str) -> bool:
        if spec.level is Level.RESTART:
            return snapshot.hosts[h].can_reach(spec)
        if spec.level.has_copies:
            return view.force_host == h or may_start_on(view.copies, h)[0]
        return True

    hosts = [h for h in snapshot.hosts
             if h not in snapshot.maintenance and snapshot.has_room(h, spec) and reaches(h)]
    return sorted(hosts, key=lambda h: (-(snapshot.hosts[h].memory_mib - snapshot.used_memory(h, spec.name)), h))


def _no_copy_reason(view: VmView) -> str:
    """Why no live host may start a level 2 VM: the state of each copy."""
    if view.copies is None:
        return "no copy of its disks"
    parts = [may_start_on(view.copies, h)[1] for h in sorted(view.copies.copies)]
    return ("no current copy on a live host with room: " + "; ".join(parts)
            + f". `ftvm vm start {view.spec.name} --accept-data-loss --host H` starts it from H's copy")


def choose_host(snapshot: PoolSnapshot, view: VmView) -> tuple[str | None, str]:
    """Where an unowned VM that should run is to be started, and why."""
    spec = view.spec
    everywhere = eligible_hosts(snapshot, view)
    eligible = at_preferred_site(snapshot, spec, everywhere)
    if view.home is None:
        if spec.preferred_host in everywhere:
            return spec.preferred_host, f"first start on preferred host {spec.preferred_host}"
        if spec.preferred_host and spec.preferred_host not in snapshot.hosts:
            return None, f"preferred host {spec.preferred_host} is not up"
        if eligible:
            return eligible[0], f"first start on {eligible[0]} (most free memory)"
        return None, f"no live host has room for {spec.memory_mib} MiB / {spec.vcpus} vCPU"
    if view.force_host is not None:
        if view.force_host in everywhere:
            return view.force_host, f"operator forced a start on {view.force_host}, accepting data loss"
        return None, f"forced start on {view.force_host} waits: that host is not up or has no room"
    if spec.level is Level.UNPROTECTED:
        if view.home in everywhere:
            return view.home, f"starting on its home host {view.home}"
        return None, f"level 0: waits for its host {view.home}"
    if view.home in eligible:
        return view.home, f"starting on its home host {view.home}"
    if eligible and view.home in everywhere:
        return eligible[0], f"site {spec.site} is its preferred site: starting on {eligible[0]}"
    if eligible:
        return eligible[0], f"host {view.home} lost; restarting on {eligible[0]}"
    if spec.level.has_copies:
        return None, f"host {view.home} lost; " + _no_copy_reason(view)
    return None, f"host {view.home} lost and no live host can take it (room or shared storage)"
