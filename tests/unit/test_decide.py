"""Table tests of the pure decision core: snapshot + local view in, decisions out."""

from __future__ import annotations

import pytest

from ftvm.core.decide import Action, choose_host, decide
from ftvm.core.model import (Desired, DiskSpec, HostInfo, Level, LocalView, LocalVm, NicSpec, Ownership,
                             PoolSnapshot, RunState, VmSpec, VmStatus, VmView)
from ftvm.core.protection import protection

SHARED = "/srv/shared"


def host(name: str, memory: int = 1024, shared: bool = True) -> HostInfo:
    return HostInfo(name, memory, 4, (SHARED,) if shared else ())


def spec(name: str = "web", level: Level = Level.RESTART, desired: Desired = Desired.RUNNING,
         memory: int = 256, disk: str = f"{SHARED}/web.img", preferred: str | None = None) -> VmSpec:
    return VmSpec(name, level, memory, 1, (DiskSpec(disk),), (NicSpec("52:54:00:00:00:01"),),
                  desired=desired, preferred_host=preferred)


def snap(hosts: list[HostInfo], *views: VmView) -> PoolSnapshot:
    return PoolSnapshot(10, {h.name: h for h in hosts}, {v.spec.name: v for v in views})


def local(me: str, *vms: LocalVm) -> LocalView:
    return LocalView(me, {v.name: v for v in vms})


def only(report, vm: str = "web"):
    [d] = [d for d in report.decisions if d.vm == vm]
    return d


def test_unowned_vm_is_claimed_by_preferred_host_only() -> None:
    s = snap([host("h1"), host("h2")], VmView(spec(preferred="h2")))
    assert only(decide(s, local("h2"))).action is Action.CLAIM
    d = only(decide(s, local("h1")))
    assert d.action is Action.WAIT and "h2" in d.reason


def test_first_start_goes_to_most_free_memory_then_name() -> None:
    s = snap([host("h1", 1024), host("h2", 2048)], VmView(spec()))
    assert choose_host(s, s.vms["web"])[0] == "h2"
    s = snap([host("h1"), host("h2")], VmView(spec()))
    assert choose_host(s, s.vms["web"])[0] == "h1"


def test_owner_starts_its_vm_with_the_fencing_token() -> None:
    s = snap([host("h1"), host("h2")], VmView(spec(), owner=Ownership("h1", 42), home="h1"))
    d = only(decide(s, local("h1")))
    assert (d.action, d.token) == (Action.START, 42)
    assert only(decide(s, local("h2"))).action is Action.WAIT


def test_level1_vm_restarts_on_survivor_when_home_host_lost() -> None:
    s = snap([host("h2")], VmView(spec(), owner=None, home="h1"))
    d = only(decide(s, local("h2")))
    assert d.action is Action.CLAIM and "h1 lost" in d.reason


def test_a_start_after_another_host_lost_the_vm_is_a_failover() -> None:
    """Counted as a failover (metrics, reports) from the decision, not from its wording."""
    lost = snap([host("h2")], VmView(spec(), owner=Ownership("h2", 7), home="h1"))
    d = only(decide(lost, local("h2")))
    assert (d.action, d.failover) == (Action.START, True)
    at_home = snap([host("h1")], VmView(spec(), owner=Ownership("h1", 7), home="h1"))
    d = only(decide(at_home, local("h1")))
    assert (d.action, d.failover) == (Action.START, False)
    crashed = local("h1", LocalVm("web", RunState.CRASHED, 7, -9))
    d = only(decide(at_home, crashed))
    assert (d.action, d.failover) == (Action.START, False) and "exited unasked" in d.reason


def test_level0_vm_waits_for_its_own_host() -> None:
    s = snap([host("h2")], VmView(spec(level=Level.UNPROTECTED), owner=None, home="h1"))
    d = only(decide(s, local("h2")))
    assert d.action is Action.WAIT and "level 0" in d.reason


def test_level1_needs_shared_storage_on_the_survivor() -> None:
    s = snap([host("h2", shared=False)], VmView(spec(), owner=None, home="h1"))
    d = only(decide(s, local("h2")))
    assert d.action is Action.WAIT and "shared storage" in d.reason


def test_no_claim_without_room() -> None:
    s = snap([host("h2", memory=512)],
             VmView(spec(memory=400), owner=None, home="h1"),
             VmView(spec("db", memory=200, disk=f"{SHARED}/db.img"), owner=Ownership("h2", 3), home="h2"))
    assert only(decide(s, local("h2"))).action is Action.WAIT


@pytest.mark.parametrize("owner", [None, Ownership("h2", 9)])
def test_running_without_ownership_is_killed(owner: Ownership | None) -> None:
    s = snap([host("h1"), host("h2")], VmView(spec(), owner=owner, home="h2"))
    d = only(decide(s, local("h1", LocalVm("web", RunState.RUNNING, 5))))
    assert d.action is Action.KILL


def test_stale_token_is_killed_even_on_the_owner_host() -> None:
    s = snap([host("h1")], VmView(spec(), owner=Ownership("h1", 9), home="h1"))
    d = only(decide(s, local("h1", LocalVm("web", RunState.RUNNING, 5))))
    assert d.action is Action.KILL and "stale" in d.reason


def test_stop_then_release() -> None:
    s = snap([host("h1")], VmView(spec(desired=Desired.STOPPED), owner=Ownership("h1", 9), home="h1"))
    assert only(decide(s, local("h1", LocalVm("web", RunState.RUNNING, 9)))).action is Action.STOP
    assert only(decide(s, local("h1", LocalVm("web", RunState.STOPPING, 9)))).action is Action.WAIT
    assert only(decide(s, local("h1", LocalVm("web", RunState.STOPPED, 9)))).action is Action.RELEASE


def test_crashed_vm_is_started_again_by_its_owner() -> None:
    s = snap([host("h1")], VmView(spec(), owner=Ownership("h1", 9), home="h1"))
    d = only(decide(s, local("h1", LocalVm("web", RunState.CRASHED, 9, exit_code=1))))
    assert d.action is Action.START and "exited" in d.reason


def test_vm_removed_from_pool_but_running_here_is_killed() -> None:
    s = snap([host("h1")])
    d = only(decide(s, local("h1", LocalVm("web", RunState.RUNNING, 9))))
    assert d.action is Action.KILL


def test_report_summary_names_actions() -> None:
    s = snap([host("h1")], VmView(spec(), owner=Ownership("h1", 9), home="h1"))
    r = decide(s, local("h1"))
    assert "web: start" in r.summary()
    r = decide(snap([host("h1")]), local("h1"))
    assert r.summary().endswith("nothing to do")


def running(owner: str) -> VmView:
    return VmView(spec(), owner=Ownership(owner, 9), home=owner,
                  status=VmStatus(owner, RunState.RUNNING, 9, 0.0))


def prot(s: PoolSnapshot):
    return protection(s, s.vms["web"])


def test_protected_only_with_a_spare_host() -> None:
    assert prot(snap([host("h1"), host("h2")], running("h1"))).protected
    p = prot(snap([host("h1")], running("h1")))
    assert not p.protected and "no other live host" in p.reason
    p = prot(snap([host("h1"), host("h2", shared=False)], running("h1")))
    assert not p.protected and "shared storage" in p.reason


def test_not_protected_reasons() -> None:
    v = VmView(spec(level=Level.UNPROTECTED), owner=Ownership("h1", 9),
               status=VmStatus("h1", RunState.RUNNING, 9, 0.0))
    assert "level 0" in str(prot(snap([host("h1"), host("h2")], v)))
    v = VmView(spec(), owner=Ownership("h1", 9), status=VmStatus("h1", RunState.STARTING, 9, 0.0))
    assert str(prot(snap([host("h1"), host("h2")], v))) == "Not protected: not running"


def test_the_agent_executes_every_action_decide_can_return() -> None:
    """The executor is a table from action to handler: a new action without a handler
    would be decided and never done."""
    from pathlib import Path

    from ftvm.agent.agent import Agent
    from ftvm.agent.config import AgentConfig
    agent = Agent(AgentConfig("h1", "p", ("http://127.0.0.1:9",), Path("/nonexistent"), "br0", 1024, 1, ()))
    table = agent.handlers
    assert set(table) == set(Action) - {Action.WAIT}


def dr_view(confirmed_at: float | None, target: str = "far", **spec_fields) -> VmView:
    from dataclasses import replace

    from ftvm.core.model import DrConfirmation
    return VmView(replace(spec(), dr_target="far", dr_rpo_s=30.0, **spec_fields), owner=None, home="h1",
                  dr_confirmed=DrConfirmation(confirmed_at, target, "h1") if confirmed_at is not None else None)


def test_a_vm_with_a_dr_target_is_claimed_only_after_its_dr_site_said_it_did_not_take_it_over() -> None:
    hosts = [host("h2")]
    now = 1000.0
    for view, why in ((dr_view(None), "never asked"), (dr_view(now - 61), "61 s ago"),
                      (dr_view(now - 5, target="other"), "never asked"), (dr_view(now + 120), "-120 s ago")):
        d = only(decide(snap(hosts, view), LocalView("h2", {}, now=now), dr_confirm=60))
        assert d.action is Action.DR_CONFIRM and "DR target far" in d.reason and why in d.reason, d
    d = only(decide(snap(hosts, dr_view(now - 59)), LocalView("h2", {}, now=now), dr_confirm=60))
    assert d.action is Action.CLAIM
    # another host than the one that would claim it asks nothing
    s = snap([host("h1"), host("h2")], replace_preferred(dr_view(None), "h1"))
    assert only(decide(s, LocalView("h2", {}, now=now))).action is Action.WAIT


def replace_preferred(view: VmView, preferred: str) -> VmView:
    from dataclasses import replace
    return replace(view, spec=replace(view.spec, preferred_host=preferred))


def test_a_vm_its_dr_site_took_over_is_never_started_or_kept_running() -> None:
    from dataclasses import replace
    now = 1000.0
    view = dr_view(now - 1, dr_failed_over="failed over to DR target far at 12:00:00")
    d = only(decide(snap([host("h2")], view), LocalView("h2", {}, now=now)))
    assert d.action is Action.WAIT and "failback" in d.reason
    # still owned here (the spec was marked while it ran): stopped, then released, never started
    owned = replace(view, owner=Ownership("h2", 7))
    running = LocalView("h2", {"web": LocalVm("web", RunState.RUNNING, 7)}, now=now)
    assert only(decide(snap([host("h2")], owned), running)).action is Action.STOP
    assert only(decide(snap([host("h2")], owned), LocalView("h2", {}, now=now))).action is Action.RELEASE
