"""DR replication from the agents (real QEMU, real agents, the lab's DR receivers): a level 2
VM's owner ships recovery points, and each point's image at the DR site holds every record
the client saw acknowledged before its cut; after the owner's host loses power the new
owner carries on with a diff point (the hashes and the few blocks that differ, not the
disk) and then increments again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


from ftvm import ops
from ftvm.core.model import DrFigures, Level, PoolSnapshot
from ftvm.core.replication import CopyState
from ftvm.dr.journal import Replica
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.qemu.cmdline import tap_name
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, l3_protected, replica_current
from ftvm.views import row_of

VM, INDEX = "dr1", 90
DISK = 64 << 20


def _point_at_least(n: int, kind: str | None = None):  # type: ignore[no-untyped-def]
    def check(snap) -> bool:  # type: ignore[no-untyped-def]
        dr = snap.vms[VM].dr
        return dr is not None and dr.newest >= n and not dr.error and (kind is None or dr.kind == kind)
    return check


def test_recovery_points_hold_every_acknowledged_record_and_survive_a_failover(
        lab: labmod.LabState, guest_image, tmp_path: Path) -> None:
    pool = LabPool(lab)
    pool.run(lambda s: ops.set_dr_target(s, "far", [topo.dr_receiver("h2")]))
    pool.define_ledger_vm(VM, INDEX, Level.COMPONENT, guest_image, host="h1", disk_size=DISK,
                          dr_target="far", dr_rpo_s=6.0)
    ip = topo.vm_addr(INDEX).split("/")[0]
    replica_dir = lab.host_dir("h2") / "local" / "dr" / "lab" / VM
    try:
        pool.wait_running(VM, 60)
        pool.wait_answering(ip, 60)
        pool.wait_for("replica in sync", replica_current(VM), 120)
        client = LabClient(lab, ip, VM, 0.02)
        try:
            client.wait_acks(50, 30)
            first = pool.snapshot().vms[VM].dr
            pool.wait_for("two increments after the first point", lambda s: _point_at_least(
                (first.newest if first else 0) + 2, "incremental")(s), 60)
        finally:
            acks = client.stop()
        # a point whose cut is after the last acknowledgement holds every record
        last_ack = max(a.t for a in acks)
        pool.wait_for("a point cut after the last acknowledgement", lambda s: s.vms[VM].dr is not None
                      and s.vms[VM].dr.newest_taken_at > last_ack and not s.vms[VM].dr.error, 60)
        snap = pool.snapshot()
        dr = snap.vms[VM].dr
        assert dr is not None and dr.kind == "incremental" and dr.receiver == topo.dr_receiver("h2")
        shown = row_of(snap, VM)["dr"]  # what status, the API and the metrics show
        assert shown is not None and shown["within_rpo"] and shown["newest"] == dr.newest, shown
        report = pool.run(lambda st: ops.availability(st, time.time() - 3600, time.time(), [VM]))[0].to_json()
        assert report["dr"]["target"] == "far" and report["dr"]["rpo_s"] == 6.0, report["dr"]
        assert report["dr"]["rpo_met_percent"] is not None, report["dr"]  # (the owner's dr-back/dr-over records)
        first_point = dr.newest
        rep = Replica(replica_dir)
        # the receiving host tells its pool which points it keeps (`ftvm dr points`)
        snap = pool.wait_for("the points published", lambda s: ("lab", VM) in s.dr_replicas
                             and s.dr_replicas[("lab", VM)].points[-1].number >= first_point, 30)
        published = snap.dr_replicas[("lab", VM)]
        assert published.host == "h2" and published.sizes == (DISK,)
        assert [p.number for p in published.points] == [n for n in rep.numbers() if n <= published.points[-1].number]
        image = rep.materialize(first_point, tmp_path / "p")[0]
        on_disk, lost = check_acked_on_disk(image, acks)
        assert lost == [] and len(acks) >= 50, (len(acks), lost[:3])
        # an earlier point, cut while the client wrote, holds every record acknowledged before
        # its cut (and maybe a few answered just after it)
        first_ack = min(a.t for a in acks)
        during = [n for n in rep.numbers() if first_ack < rep.header(n).taken_at < last_ack]
        assert during, "no point was cut while the client wrote"
        early = during[len(during) // 2]
        cut = rep.header(early).taken_at
        before = [a for a in acks if a.t < cut]
        _, lost = check_acked_on_disk(rep.materialize(early, tmp_path / "early")[0], before)
        assert lost == [] and before, (len(before), lost[:3])
        print(f"DR: point {first_point} holds all {len(acks)} acknowledged records; point {early} the "
              f"{len(before)} acknowledged before its cut")

        # the owner recorded the guest's write rate each second; `dr model VM` reads it through
        # the API and models the link with the compression the points achieved
        model = subprocess.run([sys.executable, "-m", "ftvm", "dr", "model", VM, "--bandwidth", "150mbit",
                                "--rtt", "40ms", "--interval", "2s", "--last", "10m", "-o", "json",
                                "--lab-dir", lab.dir], capture_output=True, text=True, timeout=60)
        assert model.returncode == 0, model.stderr
        modeled = json.loads(model.stdout)
        assert modeled["trace_seconds"] >= 5 and modeled["lag"]["bytes_written"] >= 512 * len(acks), modeled
        assert 0 < modeled["compression"] < 1, modeled  # (the ledger's records compress)

        # a test failover at the DR site: a copy of a point runs on h2, isolated, while the
        # production VM and its replication go on; the point is marked tested; the copy goes
        test = pool.run(lambda st: ops.dr_test(st, VM, point=early))
        assert test.host == "h2" and test.test_vm == ops.dr_test_name(VM)
        assert pool.wait_running(test.test_vm, 90) == "h2"
        tap = tap_name(test.test_vm, 0)
        on_bridge = subprocess.run(["ip", "netns", "exec", topo.host_ns("h2"), "test", "-e",
                                    f"/sys/class/net/{tap}/master"]).returncode == 0
        assert not on_bridge, f"{tap} is on a bridge"
        newest = pool.snapshot().vms[VM].dr.newest  # type: ignore[union-attr]
        pool.wait_for("the point marked tested, replication going on", lambda s: any(
            p.number == early and p.tested for p in s.dr_replicas[("lab", VM)].points)
            and s.vms[VM].dr is not None and s.vms[VM].dr.newest > newest, 60)
        assert pool.ask(ip, "P") == "PONG"  # production answers on its address, the copy is elsewhere
        pool.run(lambda st: ops.dr_test_end(st, VM))
        pool.wait_for("the test copy removed", lambda s: test.test_vm not in s.vms and ("lab", VM) not in s.dr_tests,
                      60)
        assert not (lab.host_dir("h2") / "local" / "dr-tests" / "lab" / VM).exists()

        # the owner's host loses power while the client writes: h2 runs the VM from its copy,
        # ships a diff (the hashes and what differs, not the disk), then increments
        client = LabClient(lab, ip, VM, 0.02)
        try:
            client.wait_acks(20, 30)
            labmod.fail_host(lab, "h1")
            pool.wait_running(VM, 60, not_on="h1")
            pool.wait_for("a diff point from the new owner", _point_at_least(first_point + 1, "diff"), 90)
            diff = pool.snapshot().vms[VM].dr
            assert diff is not None
            pool.wait_for("increments again", _point_at_least(diff.newest + 1, "incremental"), 60)
            client.wait_acks(20, 60, after=time.time())
        finally:
            acks += client.stop()
        hashes = DISK // (64 << 10) * 16
        assert diff.wire_bytes < hashes + DISK // 8, diff  # hashes and what changed, not the disk
        last_ack = max(a.t for a in acks)
        pool.wait_for("a point cut after the last acknowledgement", lambda s: s.vms[VM].dr is not None
                      and s.vms[VM].dr.newest_taken_at > last_ack and not s.vms[VM].dr.error, 60)
        newest = pool.snapshot().vms[VM].dr
        assert newest is not None
        image = Replica(replica_dir).materialize(newest.newest, tmp_path / "after")[0]
        _, lost = check_acked_on_disk(image, acks)
        assert lost == [], lost[:3]
        # the guest is idle now: the DR image is the new owner's copy, byte for byte
        assert image.read_bytes() == pool.copy_as_raw(VM, "h2", tmp_path / "h2.raw").read_bytes()
        print(f"after the failover: a diff point of {diff.data_bytes} bytes of data, {diff.wire_bytes} on the "
              f"wire (disk {DISK >> 20} MiB), then increments; all {len(acks)} acknowledged records at the DR site")
        events = [e for e in pool.events() if e.vm == VM and e.kind in ("dr", "dr-lag")]
        print("events:", [e.message for e in events])
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 60)
        pool.stop_and_remove(VM)
        pool.run(lambda s: ops.remove_dr_target(s, "far"))


def test_points_at_level_1_across_a_live_migration_and_a_level_change(lab: labmod.LabState, guest_image,
                                                                     tmp_path: Path) -> None:
    """A level 1 VM (its disk on shared storage) ships points holding every acknowledged
    record; its live migration is followed by a diff point of a few blocks, then increments;
    an online level change (1 -> 2: the disk graph is rebuilt under the running guest) does
    not stop them."""
    pool = LabPool(lab)
    pool.run(lambda s: ops.set_dr_target(s, "far", [topo.dr_receiver("h2")]))
    vm, ip = "drl1", topo.vm_addr(93).split("/")[0]
    pool.define_ledger_vm(vm, 93, Level.RESTART, guest_image, host="h1", dr_target="far", dr_rpo_s=6.0)
    replica_dir = lab.host_dir("h2") / "local" / "dr" / "lab" / vm
    acks: list = []  # type: ignore[type-arg]

    def load_then_check(what: str) -> None:
        _write_then_find_at_dr_site(pool, ip, vm, acks, replica_dir, tmp_path / what, what, LabClient(
            lab, ip, f"{vm}-{len(acks)}", 0.05), 20, lambda dr: not dr.error)

    try:
        pool.wait_running(vm, 90)
        pool.wait_answering(ip, 90)
        load_then_check("level 1")
        # a live migration: the new QEMU's first point is a diff (its bitmaps are new), small
        before = pool.snapshot().vms[vm].dr
        assert before is not None
        pool.run(lambda s: ops.migrate(s, vm, "h2"))
        pool.wait_running(vm, 120, not_on="h1")
        pool.wait_for("a diff point from h2", _point_of(vm, before.newest + 1, "diff"), 120)
        diff = pool.snapshot().vms[vm].dr
        assert diff is not None and diff.data_bytes <= 1 << 20, diff  # (a few blocks, not the 64 MiB disk)
        pool.wait_for("increments again", _point_of(vm, diff.newest + 1, "incremental"), 60)
        load_then_check("after the migration")
        # an online level change: points go on, small, holding every acknowledged record
        pool.run(lambda s: ops.change_level(s, vm, 2))
        pool.wait_for(f"{vm} at level 2, in sync", lambda s: s.vms[vm].spec.level is Level.COMPONENT
                      and s.vms[vm].level_change is None and replica_current(vm)(s), 180)
        load_then_check("after the level change")
        failures = [e.message for e in pool.events() if e.vm == vm and e.kind == "dr" and "failed" in e.message]
        print(f"after the migration: a diff of {diff.data_bytes} bytes ({diff.wire_bytes} on the wire), then "
              f"increments; {len(acks)} records at the DR site through a level change; point failures: {failures}")
    finally:
        pool.stop_and_remove(vm)
        pool.run(lambda s: ops.remove_dr_target(s, "far"))


def _write_then_find_at_dr_site(pool: LabPool, ip: str, vm: str, acks: list, replica_dir: Path,  # type: ignore[type-arg]
                                dest: Path, what: str, client: LabClient, count: int,
                                point_ok: Callable[[DrFigures], bool]) -> int:
    """`client` writes `count` acknowledged records (added to `acks`); then a point cut after the
    last of them, one `point_ok` accepts, holds every record acknowledged so far. Its number."""
    try:
        client.wait_acks(count, 60)
    finally:
        acks.extend(client.stop())
    last_ack = max(a.t for a in acks)
    snap = pool.wait_for(f"a point cut after the last acknowledgement ({what})", lambda s: (
        (dr := s.vms[vm].dr) is not None and dr.newest_taken_at > last_ack and point_ok(dr)), 90)
    newest = snap.vms[vm].dr.newest  # type: ignore[union-attr]
    _, lost = check_acked_on_disk(Replica(replica_dir).materialize(newest, dest)[0], acks)
    assert lost == [], (what, lost[:3])
    return newest


def _point_of(vm: str, n: int, kind: str):  # type: ignore[no-untyped-def]
    def check(snap) -> bool:  # type: ignore[no-untyped-def]
        dr = snap.vms[vm].dr
        return dr is not None and dr.newest >= n and not dr.error and dr.kind == kind
    return check


def test_points_of_a_level_3_vm_are_cut_from_its_partners_replica(lab: labmod.LabState, guest_image,
                                                                  tmp_path: Path) -> None:
    """A level 3 VM's points are cut from its partner's replica between two committed
    checkpoints (dr/standby_capture.py), not from its QEMU, whose checkpoints a point's backup
    job would break: it stays protected throughout, and every point holds every record
    acknowledged before its cut. With both A-links down it runs unprotected (no checkpoint to
    break) and its owner cuts them from its QEMU; protected again, the partner does."""
    pool = LabPool(lab)
    pool.run(lambda s: ops.set_dr_target(s, "far", [topo.dr_receiver("h2")]))
    vm, ip = "drl3", topo.vm_addr(94).split("/")[0]
    pool.define_ledger_vm(vm, 94, Level.SYSTEM, guest_image, host="h1", dr_target="far", dr_rpo_s=6.0)
    replica_dir = lab.host_dir("h2") / "local" / "dr" / "lab" / vm
    acks: list = []  # type: ignore[type-arg]

    def from_(source: str, n: int) -> Callable[[PoolSnapshot], bool]:
        def check(s: PoolSnapshot) -> bool:
            dr = s.vms[vm].dr
            return dr is not None and dr.newest >= n and not dr.error and dr.source == source
        return check

    def load_then_check(what: str, source: str) -> int:
        return _write_then_find_at_dr_site(pool, ip, vm, acks, replica_dir, tmp_path / what, what, LabClient(
            lab, ip, f"{vm}-{len(acks)}", 0.02, reply_timeout=60), 30,
            lambda dr: not dr.error and dr.newest >= 1 and dr.source == source)

    try:
        pool.wait_running(vm, 60)
        pool.wait_answering(ip, 60)
        pool.wait_for("protected", l3_protected(vm), 120)
        since = time.time()
        newest = load_then_check("protected", "h2 (partner's replica)")
        pool.wait_for("increments from the partner's replica", lambda s: from_("h2 (partner's replica)", newest + 2)(s)
                      and s.vms[vm].dr.kind == "incremental", 60)  # type: ignore[union-attr]
        snap = pool.snapshot()
        assert l3_protected(vm)(snap), snap.vms[vm].checkpoints
        dropped = [e.message for e in pool.events() if e.vm == vm and e.time > since
                   and e.kind in ("unprotected", "warning", "error")]
        assert dropped == [], dropped  # no checkpoint failed for a point
        # partner cut off: unprotected, the owner cuts points from its QEMU (a diff first)
        for k in (1, 2):
            labmod.set_a_link(lab, "h1", "h2", k, up=False)
        pool.wait_for("the replica recorded outdated", lambda s: s.vms[vm].copy_state("h2") is CopyState.OUTDATED, 30)
        newest = load_then_check("unprotected", "h1 (qemu)")
        for k in (1, 2):
            labmod.set_a_link(lab, "h1", "h2", k, up=True)
        pool.wait_for("protected again", l3_protected(vm), 120)
        since = time.time()
        newest = load_then_check("protected again", "h2 (partner's replica)")
        assert l3_protected(vm)(pool.snapshot())
        dropped = [e.message for e in pool.events() if e.vm == vm and e.time > since
                   and e.kind in ("unprotected", "warning", "error")]
        assert dropped == [], dropped
        print(f"level 3: {len(acks)} acknowledged records at the DR site, points from the partner's replica, "
              f"the owner's QEMU while unprotected, the replica again (point {newest})")
    finally:
        for k in (1, 2):
            labmod.set_a_link(lab, "h1", "h2", k, up=True)
        pool.stop_and_remove(vm)
        pool.run(lambda s: ops.remove_dr_target(s, "far"))
