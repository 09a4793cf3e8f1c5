"""Long campaigns, run on request: ./setup.sh test -m slow"""

from __future__ import annotations

import pytest

from ftvm.core.model import Level
from ftvm.lab import lab as labmod
from ftvm.lab.scenario import LabPool, copy_is, host_failure

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_repeated_level1_failover_back_and_forth(lab: labmod.LabState, guest_image) -> None:
    """One VM, ten host losses alternating between the two hosts: nothing acknowledged is
    ever lost, and never two copies."""
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("camp", 5, Level.RESTART, guest_image, host="h1")
    results = []
    try:
        for _ in range(10):
            r = host_failure(pool, spec)
            results.append(r)
            labmod.restore_host(lab, r.failed_host)
            labmod.wait_for_hosts(lab, lab.hosts, 30)
        assert [r.lost for r in results] == [0] * 10
        assert max(r.max_copies for r in results) == 1
        assert [r.failed_host for r in results] == ["h1", "h2"] * 5
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        pool.stop_and_remove("camp")


def test_repeated_level2_failover_back_and_forth(lab: labmod.LabState, guest_image) -> None:
    """One level 2 VM, six primary power losses alternating between the hosts, the old
    primary resynced in full each time before the next: nothing acknowledged is lost."""
    from ftvm.core.replication import CopyState
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("camp2", 6, Level.COMPONENT, guest_image, host="h1")

    try:
        pool.wait_running("camp2", 60)
        pool.wait_for("mirrored", copy_is("camp2", "h2", CopyState.CURRENT), 60)
        results = []
        for _ in range(6):
            r = host_failure(pool, spec)
            results.append(r)
            labmod.restore_host(lab, r.failed_host)
            pool.wait_for("old primary resynced", copy_is("camp2", r.failed_host, CopyState.CURRENT), 120)
        assert [r.lost for r in results] == [0] * 6
        assert max(r.max_copies for r in results) == 1
        assert [r.failed_host for r in results] == ["h1", "h2"] * 3
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        pool.stop_and_remove("camp2")


def test_repeated_level3_failover_back_and_forth(lab: labmod.LabState, guest_image) -> None:
    """One level 3 VM, ten primary power losses alternating between the hosts, protection
    rebuilt between: the client's one connection survives every one, no gap or repeat in
    the acknowledged sequence, every record on the disk, the guest healthy for 60 s after each."""
    from ftvm.lab.scenario import l3_protected, level3_failover
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("camp3", 7, Level.SYSTEM, guest_image, host="h1")
    try:
        results = []
        for _ in range(10):
            r = level3_failover(pool, spec, healthy_s=60)
            results.append(r)
            labmod.restore_host(lab, r.failed_host)
            pool.wait_for("protected again", l3_protected("camp3"), 120)
        assert all(r.connection_kept for r in results), [r.connections for r in results]
        assert [(r.lost, r.seq_gaps, r.seq_repeats) for r in results] == [(0, 0, 0)] * 10
        assert [r.guest_problems for r in results] == [[]] * 10
        assert max(r.max_copies for r in results) == 1
        assert [r.failed_host for r in results] == ["h1", "h2"] * 5
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        pool.stop_and_remove("camp3")


def test_moves_and_level_changes_campaign(lab: labmod.LabState, guest_image) -> None:
    """One VM under a client on one connection goes round and round: at each of levels 1,
    2 and 3 it migrates to the other host and back, then its level changes online to the
    next (1 -> 2 -> 3 -> 2 -> 1), three times over. Nothing acknowledged is lost, the
    connection is never dropped, the ledger sequence never breaks, and at levels 2-3 it is
    Protected before each move."""
    import time
    from pathlib import Path

    from ftvm import ops
    from ftvm.core.protection import protection
    from ftvm.lab import topology as topo
    from ftvm.lab.scenario import LabClient, check_acked_on_disk, sequence_breaks
    from ftvm.views import level_progress, row_of, runs_on
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("round", 7, Level.RESTART, guest_image, host="h1")
    ip = topo.vm_addr(7).split("/")[0]
    client = None
    try:
        pool.wait_running("round", 60)
        pool.wait_answering(ip, 60)
        client = LabClient(lab, ip, "round", 0.02, reply_timeout=60)
        client.wait_acks(20, 30)
        for _ in range(3):
            for level in (1, 2, 3, 2, 1):
                snap = pool.snapshot()
                if int(snap.vms["round"].spec.level) != level:
                    pool.run(lambda s, lv=level: ops.change_level(  # back onto its first image
                        s, "round", lv, (spec.disks[0].path,) if lv == 1 else (), overwrite=lv == 1))
                pool.wait_for(f"level {level} done", lambda s, lv=level: level_progress(
                    row_of(s, "round"), lv)[0] == "done", 120)
                if level >= 2:
                    pool.wait_for("protected", lambda s: protection(s, s.vms["round"]).protected, 120)
                for target in ("h2", "h1"):
                    pool.run(lambda s, t=target: ops.migrate(s, "round", t))
                    pool.wait_for(f"on {target}", lambda s, t=target: runs_on(s, "round", t), 60)
                    if level >= 2:
                        pool.wait_for("protected", lambda s: protection(s, s.vms["round"]).protected, 120)
                client.wait_acks(10, 30, after=time.time())
        acks = client.stop()
        assert [e.get("kind") for e in client.other_events()] == ["connect"], client.other_events()
        assert sequence_breaks(acks) == (0, 0)
        assert check_acked_on_disk(Path(spec.disks[0].path), acks)[1] == []
    finally:
        if client is not None:
            client.stop()
        pool.stop_and_remove("round")


def test_a_random_fault_campaign_keeps_every_invariant(lab3: labmod.LabState, guest_image) -> None:
    """`ftvm lab campaign`: random faults against VMs at levels 1-3 with clients writing;
    after every cycle nothing acknowledged is lost, never two copies ran, every VM is
    protected again and nothing leaked. (Run longer by hand: `ftvm lab campaign --cycles N`.)"""
    from ftvm.lab.campaign import render, run_campaign
    report = run_campaign(lab3, guest_image, seed=7, cycles=8, levels=(1, 2, 3))
    print(render(report))
    assert report.violations == []
    assert len(report.cycles) == 8 and all(n >= 50 for n in report.acked.values()), report.acked
    assert not LabPool(lab3).snapshot().vms  # (its VMs removed on the way out)
