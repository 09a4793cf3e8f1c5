"""Level 2 pure parts: copies rules, block graph plans, decisions."""

from __future__ import annotations

import pytest

from ftvm.core.decide import Action, choose_host, decide
from ftvm.core.model import (Desired, DiskSpec, Export, HostInfo, Level, LocalView, LocalVm, NicSpec, Ownership,
                             PoolSnapshot, RunState, VmSpec, VmStatus, VmView)
from ftvm.core.protection import protection
from ftvm.core.replication import Copies, CopyState, claim_copies, may_start_on, mark, new_copies
from ftvm.qemu.blockgraph import NbdTarget
from ftvm.qemu.blockgraph import LocalImage, Mode, add_remote, drop_child, local_only_start, mirror, node_kind

IMG = LocalImage("/l/disk0.img", "raw")
EXP = NbdTarget("10.79.0.2", 10809, "web-d0")


def spec(desired: Desired = Desired.RUNNING) -> VmSpec:
    return VmSpec("web", Level.COMPONENT, 256, 1, (DiskSpec(size=64 << 20),), (NicSpec("52:54:00:00:00:01"),),
                  desired=desired)


def hosts(*names: str) -> dict[str, HostInfo]:
    return {n: HostInfo(n, 1024, 4) for n in names}


# --- copies ------------------------------------------------------------------------

def test_new_vm_partner_starts_outdated_and_incremental() -> None:
    c = new_copies("h1", "h2", 1.0)
    assert c.current_hosts() == ["h1"] and not c.copies["h2"].full


def test_only_a_current_copy_may_start() -> None:
    c = mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "in sync", 2.0)
    assert may_start_on(c, "h2")[0]
    c2 = mark(c, "h2", CopyState.OUTDATED, "replication failed", 3.0)
    ok, why = may_start_on(c2, "h2")
    assert not ok and "outdated" in why and c2.gen > c.gen
    assert not may_start_on(c2, "h3")[0]


def test_failover_outdates_old_primary_for_a_full_resync() -> None:
    c = mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "in sync", 2.0)
    after = claim_copies(c, "h2", "h1", None, 3.0)
    assert after.copies["h1"].state is CopyState.OUTDATED and after.copies["h1"].full
    assert after.copies["h2"].state is CopyState.CURRENT


def test_restart_on_same_host_outdates_partner_incrementally_or_fully() -> None:
    c = mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "in sync", 2.0)
    assert not claim_copies(c, "h1", "h1", None, 3.0).copies["h2"].full
    behind = mark(c, "h2", CopyState.OUTDATED, "x", 4.0)
    assert claim_copies(behind, "h1", "h1", None, 5.0).copies["h2"].full  # its bitmap died with QEMU


def test_forced_start_makes_the_chosen_copy_the_reference() -> None:
    c = mark(new_copies("h1", "h2", 1.0), "h2", CopyState.OUTDATED, "apart", 2.0)
    after = claim_copies(c, "h2", "h1", None, 3.0, forced=True)
    assert after.current_hosts() == ["h2"] and after.copies["h1"].full


def test_pending_full_resync_survives_further_failures() -> None:
    c = Copies(3, {"h1": new_copies("h1", None, 0).copies["h1"]})
    c = mark(c, "h2", CopyState.OUTDATED, "took over", 1.0, full=True)
    c = mark(c, "h2", CopyState.SYNCING, "resync", 2.0)
    c = mark(c, "h2", CopyState.OUTDATED, "interrupted", 3.0)
    assert c.copies["h2"].full
    assert not mark(c, "h2", CopyState.CURRENT, "in sync", 4.0).copies["h2"].full


# --- block graphs ------------------------------------------------------------------

def test_start_is_local_only() -> None:
    g, nodes = local_only_start(0, IMG)
    assert g.mode is Mode.LOCAL_ONLY and nodes[-1] == {"driver": "raw", "node-name": "disk0", "file": g.local}
    assert nodes[0]["file"]["locking"] == "on"


def test_mirror_then_drop_remote_keeps_local_path() -> None:
    g, _ = local_only_start(0, IMG)
    g, steps, spare = add_remote(g, EXP)
    g2, steps = mirror(g, spare, IMG)
    assert g2.mode is Mode.MIRRORED and g2.remote == spare
    quorum = next(a for c, a in steps if c == "blockdev-add" and a["driver"] == "quorum")
    assert quorum["vote-threshold"] == 2 and quorum["children"] == [g2.local, spare]
    g3, steps = drop_child(g2, "remote", IMG, EXP)
    cmds = [c for c, _ in steps]
    # a second path joins before the failed child leaves; the top moves before the quorum goes
    assert cmds.index("x-blockdev-change") < cmds.index("blockdev-reopen") < cmds.index("blockdev-del", 4)
    assert steps[2] == ("x-blockdev-change", {"parent": g2.quorum, "child": "children.1"})
    assert g3.mode is Mode.LOCAL_ONLY and g3.remote is None and g3.local not in (g2.local, None)
    names = [a.get("node-name") for c, a in steps if c == "blockdev-add"]
    assert len(set(names)) == len(names)


def test_drop_local_continues_on_remote() -> None:
    g, _ = local_only_start(0, IMG)
    g, _, spare = add_remote(g, EXP)
    g, _ = mirror(g, spare, IMG)
    assert node_kind(g, g.local or "") == "local" and node_kind(g, spare) == "remote"
    g2, steps = drop_child(g, "local", IMG, EXP)
    assert g2.mode is Mode.REMOTE_ONLY and g2.local is None
    assert steps[2] == ("x-blockdev-change", {"parent": g.quorum, "child": "children.0"})
    with pytest.raises(ValueError):
        drop_child(g2, "remote", IMG, EXP)


# --- decisions -----------------------------------------------------------------------

def current_both() -> Copies:
    return mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "in sync", 2.0)


def test_partner_exports_while_vm_runs_elsewhere() -> None:
    s = PoolSnapshot(5, hosts("h1", "h2"), {"web": VmView(spec(), owner=Ownership("h1", 7), home="h1",
                                                          copies=current_both())})
    d = [x for x in decide(s, LocalView("h2")).decisions if x.action is Action.EXPORT]
    assert d and "partner of h1" in d[0].reason
    assert not [x for x in decide(s, LocalView("h1")).decisions if x.action is Action.EXPORT]
    d = decide(s, LocalView("h2", exports=frozenset({"web"})))
    assert not [x for x in d.decisions if x.action in (Action.EXPORT, Action.UNEXPORT)]


def test_partner_stops_exporting_when_vm_stops_or_is_removed() -> None:
    s = PoolSnapshot(5, hosts("h1", "h2"), {"web": VmView(spec(Desired.STOPPED), home="h1", copies=current_both())})
    d = decide(s, LocalView("h2", exports=frozenset({"web"})))
    assert [x.action for x in d.decisions if x.vm == "web"][-1] is Action.UNEXPORT
    d = decide(PoolSnapshot(5, hosts("h2"), {}), LocalView("h2", exports=frozenset({"web"})))
    assert [x.action for x in d.decisions] == [Action.UNEXPORT]


def test_outdated_copy_is_not_claimed_but_forced_one_is() -> None:
    copies = mark(current_both(), "h2", CopyState.OUTDATED, "replication to h2 failed", 3.0)
    view = VmView(spec(), home="h1", copies=copies)
    s = PoolSnapshot(5, hosts("h2"), {"web": view})
    target, why = choose_host(s, view)
    assert target is None and "outdated" in why and "--accept-data-loss" in why
    forced = VmView(spec(), home="h1", copies=copies, force_host="h2")
    s = PoolSnapshot(5, hosts("h2"), {"web": forced})
    d = decide(s, LocalView("h2"))
    assert d.decisions[0].action is Action.CLAIM and "forced" in d.decisions[0].reason


def test_level2_protection_reasons() -> None:
    running = VmStatus("h1", RunState.RUNNING, 7, 0.0)
    exports = (Export("h2", "10.79.0.2", 1),)

    def prot(copies: Copies, live: tuple[str, ...] = ("h1", "h2"), ex=exports) -> str:
        v = VmView(spec(), owner=Ownership("h1", 7), status=running, home="h1", copies=copies, exports=ex)
        return str(protection(PoolSnapshot(1, hosts(*live), {"web": v}), v))

    assert prot(current_both()) == "Protected"
    assert "not serving" in prot(current_both(), ex=())
    assert "partner h2 is down" in prot(current_both(), live=("h1",))
    assert "replica on h2 outdated since" in prot(mark(current_both(), "h2", CopyState.OUTDATED, "x", 5.0))
    failed = mark(current_both(), "h1", CopyState.FAILED, "EIO", 5.0)
    assert "local disk on h1 failed" in prot(failed)


def test_running_local_vm_blocks_export_on_same_host() -> None:
    s = PoolSnapshot(5, hosts("h1", "h2"), {"web": VmView(spec(), owner=Ownership("h1", 7), home="h1",
                                                          copies=current_both())})
    d = decide(s, LocalView("h2", vms={"web": LocalVm("web", RunState.RUNNING, 3)}))
    assert [x.action for x in d.decisions] == [Action.KILL]


def test_replica_text_shows_sync_progress_and_eta() -> None:
    from ftvm.core.model import SyncProgress
    from ftvm.core.protection import replica_text
    syncing = mark(current_both(), "h2", CopyState.SYNCING, "resync of changed blocks", 5.0)
    v = VmView(spec(), owner=Ownership("h1", 7), home="h1", copies=syncing,
               sync=SyncProgress("h2", 25 << 20, 100 << 20, 10 << 20, False))
    assert replica_text(v) == "syncing 25% (ETA 8 s)"
    assert replica_text(VmView(spec(), owner=Ownership("h1", 7), copies=current_both())) == "in sync"
    outdated = mark(current_both(), "h2", CopyState.OUTDATED, "x", 5.0)
    assert replica_text(VmView(spec(), owner=Ownership("h1", 7), copies=outdated)).startswith("outdated since ")


def test_remote_only_back_to_mirrored_after_local_repair() -> None:
    from ftvm.qemu.blockgraph import add_local, mirror_back
    g, _ = local_only_start(0, IMG)
    g, _, spare = add_remote(g, EXP)
    g, _ = mirror(g, spare, IMG)
    g, _ = drop_child(g, "local", IMG, EXP)
    g2, steps, local = add_local(g, IMG)
    assert steps[0][1]["file"]["filename"] == IMG.path
    g3, steps = mirror_back(g2, local, EXP)
    assert g3.mode is Mode.MIRRORED and g3.local == local
    quorum = next(a for c, a in steps if c == "blockdev-add" and a["driver"] == "quorum")
    assert quorum["children"][0] == local  # reads go to the local copy first again
    assert steps[-1] == ("blockdev-del", {"node-name": g2.remote})


# --- live migration ------------------------------------------------------------------

def _mirrored() -> Copies:
    return mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "in sync", 2.0)


def test_migration_claim_outdates_the_old_copy_incrementally() -> None:
    """The old primary's copy was identical when the source paused: resync from the bitmap."""
    c = claim_copies(_mirrored(), "h2", "h1", "h1", 5.0, migrated=True)
    assert c.current_hosts() == ["h2"]
    assert c.copies["h1"].state is CopyState.OUTDATED and not c.copies["h1"].full
    assert "moved live" in c.copies["h1"].reason
    # a failover (not a migration) of the same record resyncs the old primary in full
    assert claim_copies(_mirrored(), "h2", "h1", "h1", 5.0).copies["h1"].full


def test_level2_migrates_only_to_a_current_copy() -> None:
    from ftvm.core.placement import migration_problem
    hs = {n: HostInfo(n, 1024, 4, replication_addr=f"10.79.0.{i}") for i, n in enumerate(("h1", "h2", "h3"), 1)}
    running = VmStatus("h1", RunState.RUNNING, 5, 1.0)

    def view(copies: Copies) -> VmView:
        return VmView(spec(), Ownership("h1", 5), running, home="h1", copies=copies)

    ok = view(_mirrored())
    snap = PoolSnapshot(9, hs, {"web": ok})
    assert migration_problem(snap, ok, "h2") is None
    problem = migration_problem(snap, ok, "h3")
    assert problem is not None and "h3 holds no copy" in problem
    behind = view(new_copies("h1", "h2", 1.0))
    problem = migration_problem(PoolSnapshot(9, hs, {"web": behind}), behind, "h2")
    assert problem is not None and "copy on h2 is outdated" in problem and "current: h1" in problem


# --- the partner probe -----------------------------------------------------------------

def test_partner_probe_wants_the_greeting_and_ends_the_handshake_cleanly() -> None:
    """A daemon that greets answers, and the probe ends the negotiation with NBD_OPT_ABORT
    (a bare close has QEMU's server log an error at every probe); one that accepts but
    never greets (hung) does not answer."""
    import asyncio
    import struct

    from ftvm.agent.replica import _port_answers
    from ftvm.core.model import Export as ExportRecord

    async def run() -> tuple[bool, bytes, bool]:
        received = bytearray()

        async def greeting_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"NBDMAGICIHAVEOPT\x00\x03")
            received.extend(await reader.readexactly(20))
            writer.write(struct.pack(">QIII", 0x3e889045565a9, 2, 1, 0))
            await writer.drain()
            writer.close()

        async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(2)
            writer.close()

        good = await asyncio.start_server(greeting_server, "127.0.0.1", 0)
        hung = await asyncio.start_server(silent_server, "127.0.0.1", 0)
        async with good, hung:
            ok = await _port_answers(ExportRecord("h2", "127.0.0.1", good.sockets[0].getsockname()[1]))
            silent = await _port_answers(ExportRecord("h2", "127.0.0.1", hung.sockets[0].getsockname()[1]), 0.2)
        return ok, bytes(received), silent

    ok, received, silent = asyncio.run(run())
    assert ok and not silent
    assert received == struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 2, 0)


@pytest.mark.parametrize("case, view_kw, me, expect", [
    # (what, VmView fields, claimer, {host: (state, full)} of the record written; None: no record)
    ("level 1: no copies", dict(level=Level.RESTART), "h1", None),
    ("a new VM: a partner is named, outdated", dict(), "h1",
     {"h1": (CopyState.CURRENT, False), "h2": (CopyState.OUTDATED, False)}),
    ("failover: the old primary's copy goes outdated in full", dict(current=("h1", "h2"), home="h1"), "h2",
     {"h1": (CopyState.OUTDATED, True), "h2": (CopyState.CURRENT, False)}),
    ("restart at home: the partner catches up incrementally", dict(current=("h1", "h2"), home="h1"), "h1",
     {"h1": (CopyState.CURRENT, False), "h2": (CopyState.OUTDATED, False)}),
    ("migrated here: the source's copy catches up incrementally",
     dict(current=("h1", "h2"), home="h1", handover_host="h2"), "h2",
     {"h1": (CopyState.OUTDATED, False), "h2": (CopyState.CURRENT, False)}),
    ("forced start on an outdated copy", dict(current=("h1",), home="h1", force_host="h2"), "h2",
     {"h1": (CopyState.OUTDATED, True), "h2": (CopyState.CURRENT, False)}),
])
def test_claim_plan(case: str, view_kw: dict, me: str, expect: dict | None) -> None:  # type: ignore[type-arg]
    from dataclasses import replace
    from ftvm.core.placement import claim_plan
    kw = dict(view_kw)
    s = replace(spec(), level=kw.pop("level", Level.COMPONENT))
    current = kw.pop("current", None)
    copies = None
    if current is not None:
        copies = new_copies("h1", "h2", 1.0)
        for h in ("h1", "h2"):
            copies = mark(copies, h, CopyState.CURRENT if h in current else CopyState.OUTDATED, "x", 2.0)
    snap = PoolSnapshot(hosts={n: HostInfo(n, 1024, 4, replication_addr=f"10.79.0.{i}")
                               for i, n in enumerate(("h1", "h2"), 1)}, vms={}, revision=1)
    plan = claim_plan(snap, VmView(s, copies=copies, **kw), me, 3.0)
    if expect is None:
        assert plan is None, case
        return
    assert plan is not None, case
    assert {h: (c.state, c.full) for h, c in plan.copies.items()} == expect, case


def test_every_level_pair_has_its_online_transition_or_none() -> None:
    from ftvm.core.transitions import Transition as T
    from ftvm.core.transitions import transition
    L0, L1, L2, L3 = Level.UNPROTECTED, Level.RESTART, Level.COMPONENT, Level.SYSTEM
    table = {(L0, L1): None, (L1, L0): None, (L0, L2): T.RAISE_TO_COMPONENT, (L1, L2): T.RAISE_TO_COMPONENT,
             (L2, L0): T.LOWER_FROM_COMPONENT, (L2, L1): T.LOWER_FROM_COMPONENT, (L0, L3): T.RAISE_TO_SYSTEM,
             (L1, L3): T.RAISE_TO_SYSTEM, (L2, L3): T.RAISE_TO_SYSTEM, (L3, L0): T.LOWER_FROM_SYSTEM,
             (L3, L1): T.LOWER_FROM_SYSTEM, (L3, L2): T.LOWER_FROM_SYSTEM}
    for a in Level:
        for b in Level:
            assert transition(a, b) == (None if a == b else table[(a, b)]), (a, b)
