"""Agent restarts that guests never notice (qemu/keeper.py, agent/adoption.py), in a real
lab: a rolling upgrade over every host with VMs at every level, and the fence that still
holds when an agent does not come back.

"No guest restarts" is checked from outside: the QEMU process of a level 0-2 VM is the
same before and after (its PID, seen in /proc), and every client keeps its one TCP
connection to its guest throughout (the ledger client logs each connect). A level 3 VM
whose primary's agent restarts moves to its partner from the last checkpoint; its client's
connection staying open is what shows the guest carried on.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ftvm.core.model import Level, PoolSnapshot
from ftvm.core.protection import protection
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.observer import CopyObserver, find_copies
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk

pytestmark = pytest.mark.lab

VMS = {  # name: (level, index, preferred host)
    "up0": (Level.UNPROTECTED, 60, "h1"),
    "up1": (Level.RESTART, 61, "h1"),
    "up2": (Level.COMPONENT, 62, "h2"),
    "up3": (Level.SYSTEM, 63, "h2"),
}


def _all_protected(names: list[str]):  # type: ignore[no-untyped-def]
    def check(snap: PoolSnapshot) -> bool:
        return all(n in snap.vms and (snap.vms[n].spec.level is Level.UNPROTECTED or
                                      protection(snap, snap.vms[n]).protected) for n in names)
    return check


def test_a_rolling_upgrade_at_every_level_interrupts_no_guest(lab: labmod.LabState, guest_image) -> None:
    """Each host's agent in turn is restarted: h1's crashes (SIGKILL, started again at
    once), h2's leaves for an upgrade (SIGUSR2). Levels 0 and 1 run on h1; level 2 and 3
    run on h2 with h1 as their partner: each level is primary, and each copy partner, on
    a host while its agent is away."""
    pool = LabPool(lab)
    names = list(VMS)
    for name, (level, index, host) in VMS.items():
        pool.define_ledger_vm(name, index, level, guest_image, host=host)
    clients: dict[str, LabClient] = {}
    try:
        for name, (_, index, _) in VMS.items():
            pool.wait_running(name, 120)
            pool.wait_answering(topo.vm_addr(index).split("/")[0], 120)
        pool.wait_for("every VM protected", _all_protected(names), 180)
        before = {n: find_copies(n) for n in names}
        assert all(len(c) == 1 for c in before.values()), before
        clients = {n: LabClient(lab, topo.vm_addr(VMS[n][1]).split("/")[0], n) for n in names}
        for c in clients.values():
            c.wait_acks(20, 60)
        observers = {n: CopyObserver(n).start() for n in names}
        started = time.time()
        try:
            for host, how in (("h1", "kill"), ("h2", "detach")):
                t = time.time()
                labmod.restart_agent(lab, host, how=how)
                pool.wait_events(f"{host}'s new agent up", lambda e, h=host, t=t: e.host == h and e.time > t
                                 and e.kind == "agent" and "agent up" in e.message and " kept," in e.message, 30)
                pool.wait_for("every VM protected again", _all_protected(names), 180)
                for c in clients.values():  # the guests still answer, on the same connections
                    c.wait_acks(10, 60, after=time.time())
        finally:
            for o in observers.values():
                o.stop()
        events = [e for e in pool.events(1000) if e.time > started]
        adopted = {(e.host, e.vm) for e in events if e.kind == "adopt"}
        acks = {n: c.stop() for n, c in clients.items()}
        # levels 0-2: the very same QEMU process all along (no guest restart)
        for name in ("up0", "up1", "up2"):
            assert find_copies(name) == before[name], (name, before[name], find_copies(name))
        assert ("h1", "up0") in adopted and ("h1", "up1") in adopted and ("h2", "up2") in adopted, adopted
        # level 3: taken over from the last checkpoint when its primary's agent left
        assert any(e.vm == "up3" and e.kind == "takeover" for e in events)
        for name, c in clients.items():
            connects = [e for e in c.other_events() if e.get("kind") == "connect"]
            errors = [e for e in c.other_events() if e.get("kind") != "connect"]
            assert len(connects) == 1 and not errors, (name, c.other_events())
            assert len(acks[name]) > 100
        for name, o in observers.items():
            assert o.max_executing <= 1, (name, o.overlaps[:3])
        assert not [e for e in events if e.kind in ("fence", "error")], [
            (e.host, e.vm, e.kind, e.message) for e in events if e.kind in ("fence", "error")]
        # every acknowledged record is on the disk the VM runs from
        snap = pool.snapshot()
        for name in names:
            owner = snap.vms[name].owner
            assert owner is not None
            image = pool.copy_as_raw(name, owner.host, lab.shared_dir / f"check-{name}.raw") \
                if VMS[name][0].has_copies else lab.shared_dir / f"{name}.img"
            _, lost = check_acked_on_disk(image, acks[name])
            assert not lost, (name, lost[:3])
    finally:
        for c in clients.values():
            c.stop()
        for name in names:
            pool.stop_and_remove(name)


def test_an_agent_that_does_not_come_back_still_fences(lab: labmod.LabState, guest_image) -> None:
    """Its VMs' keepers kill them before its lease can expire; survivors restart them;
    never two copies; the next agent (a new lease) says what the keepers did."""
    pool = LabPool(lab)
    names = {"gone1": (Level.RESTART, 64), "gone2": (Level.COMPONENT, 65)}
    for name, (level, index) in names.items():
        pool.define_ledger_vm(name, index, level, guest_image, host="h1")
    observers: list[CopyObserver] = []
    try:
        for name in names:
            assert pool.wait_running(name, 120) == "h1"
        pool.wait_for("every VM protected", _all_protected(list(names)), 180)
        observers = [CopyObserver(n).start() for n in names]
        killed = time.time()
        os.kill(lab.pids["agent-h1"], signal.SIGKILL)
        for name in names:
            pool.wait_running(name, 60, not_on="h1")
        for o in observers:
            o.stop()
            assert o.max_copies == 1 and o.samples > 50, o.overlaps[:3]
        assert all(ns != topo.host_ns("h1") for n in names for _, ns in find_copies(n))
        labmod.start_agent(lab, "h1")
        lab.save()
        labmod.wait_for_hosts(lab, ["h1"], 60)
        fenced = pool.wait_events("the keepers' fence reported", lambda e: e.host == "h1" and e.time > killed
                                  and e.kind == "fence" and "killed by its keeper" in e.message, 30)
        assert {e.vm for e in fenced} == set(names)
        assert not [e for e in pool.events(500) if e.time > killed and e.kind == "adopt"]
    finally:
        for o in observers:
            o.stop()
        if "agent-h1" not in lab.pids or not os.path.exists(f"/proc/{lab.pids['agent-h1']}"):
            labmod.start_agent(lab, "h1")
            lab.save()
            labmod.wait_for_hosts(lab, ["h1"], 60)
        for name in names:
            pool.stop_and_remove(name)
