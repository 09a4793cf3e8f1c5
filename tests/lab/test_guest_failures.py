"""A guest that fails on its own, against a real lab pool: its kernel panics (the demo
guest's "X panic"), QEMU's pvpanic device reports it, the owner restarts the guest where it
runs, at levels 1, 2 and 3, with nothing acknowledged lost; past the restart limit the VM is
left stopped, says why, and starts again when an operator asks."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import Desired, Level
from ftvm.core.protection import protection
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, l3_protected, replica_current

pytestmark = pytest.mark.lab


def _ip(index: int) -> str:
    return topo.vm_addr(index).split("/")[0]


def test_a_guest_panic_restarts_the_guest_where_it_runs_at_every_level(lab: labmod.LabState, guest_image,
                                                                      tmp_path: Path) -> None:
    pool = LabPool(lab)
    vms = [("gp1", 60, Level.RESTART), ("gp2", 61, Level.COMPONENT), ("gp3", 62, Level.SYSTEM)]
    for name, index, level in vms:
        pool.define_ledger_vm(name, index, level, guest_image, host="h1")
    try:
        for name, index, level in vms:
            pool.wait_running(name, 60)
            pool.wait_answering(_ip(index), 60)
            if level is Level.COMPONENT:
                pool.wait_for(f"{name}'s replica in sync", replica_current(name), 120)
            if level is Level.SYSTEM:
                pool.wait_for(f"{name} protected", l3_protected(name), 120)
        for name, index, level in vms:
            client = LabClient(lab, _ip(index), name, 0.02, reply_timeout=60)
            try:
                client.wait_acks(20, 30)
                panicked_at = time.time()
                assert pool.ask(_ip(index), "X panic") == "OK X panic"
                restarts = pool.wait_events(f"{name}'s guest restarted", lambda e, n=name, t=panicked_at: e.vm == n
                                            and e.kind == "guest-restart" and e.time > t, 60)
                pool.wait_answering(_ip(index), 120)
                client.wait_acks(20, 60, after=time.time())
            finally:
                acks = client.stop()
            assert "kernel panic" in restarts[0].message and "1 of 3 restarts" in restarts[0].message
            print(f"{name} (level {int(level)}): panic -> guest reset {restarts[0].time - panicked_at:.2f} s")
            snap = pool.snapshot()
            view = snap.vms[name]
            assert view.owner is not None and view.owner.host == "h1"  # restarted where it ran
            assert view.guest is not None and len(view.guest.failures) == 1 and not view.guest.gave_up
            events = [e for e in pool.events() if e.vm == name and e.time > panicked_at]
            assert not [e for e in events if e.kind in ("takeover", "claim", "fence")], events
            if level is Level.RESTART:
                disk = Path(view.spec.disks[0].path)
            elif level is Level.COMPONENT:
                disk = pool.copy_as_raw(name, "h1", tmp_path / f"{name}.raw")
            else:
                disk = pool.copy_path(name, "h1")[0]
            on_disk, lost = check_acked_on_disk(disk, acks)
            assert lost == [] and len(acks) >= 40, (len(acks), lost)
            if level is Level.SYSTEM:  # the reset went to the replica too; protection carried on
                pool.wait_for(f"{name} protected after the restart", l3_protected(name), 60)
            if level is Level.COMPONENT:
                pool.wait_for(f"{name}'s replica in sync after the restart", replica_current(name), 60)
    finally:
        for name, _, _ in vms:
            pool.stop_and_remove(name)


def test_past_the_restart_limit_the_vm_is_left_stopped_until_an_operator_starts_it(
        lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("gpl", 63, Level.RESTART, guest_image, host="h1", start=False)

    async def one_restart(store):  # type: ignore[no-untyped-def]
        got = await store.spec("gpl")
        assert got is not None
        return await store.update_spec(replace(got[0], guest_restarts=1, desired=Desired.RUNNING), got[1])
    assert pool.run(one_restart)
    ip = _ip(63)
    try:
        pool.wait_running("gpl", 60)
        pool.wait_answering(ip, 60)
        t0 = time.time()
        pool.ask(ip, "X panic")
        pool.wait_events("the first restart", lambda e: e.vm == "gpl" and e.kind == "guest-restart"
                         and e.time > t0, 60)
        pool.wait_answering(ip, 120)
        t1 = time.time()
        pool.ask(ip, "X panic")
        gave_up = pool.wait_events("giving up", lambda e: e.vm == "gpl" and e.kind == "guest-gave-up"
                                   and e.time > t1, 60)
        assert "guest failed 2 times in 1 h" in gave_up[0].message
        pool.wait_for("left stopped and released", lambda s: s.vms["gpl"].owner is None, 60)
        snap = pool.snapshot()
        view = snap.vms["gpl"]
        assert view.spec.desired is Desired.RUNNING  # the operator's wish stands; ftvm gave up on it
        assert "guest failed 2 times in 1 h" in str(protection(snap, view))
        assert not [e for e in pool.events() if e.vm == "gpl" and e.kind in ("claim", "start")
                    and e.time > gave_up[0].time]
        assert pool.run(lambda s: ops.set_desired(s, "gpl", Desired.RUNNING))  # `ftvm vm start gpl`
        pool.wait_running("gpl", 60)
        pool.wait_answering(ip, 60)
        assert pool.snapshot().vms["gpl"].guest is None
    finally:
        pool.stop_and_remove("gpl")
    del spec
