"""A 3-host pool: partners spread over the hosts, protection rebuilt on the third host
after a failover (levels 2 and 3), overcommit refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import Level
from ftvm.core.protection import protection
from ftvm.errors import FtvmError
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, sequence_breaks

pytestmark = pytest.mark.lab


def protected_with(vm: str, partner: str):
    def check(snap) -> bool:
        view = snap.vms.get(vm)
        return (view is not None and view.owner is not None and view.copies is not None
                and view.copies.partner_of(view.owner.host) == partner and protection(snap, view).protected)
    return check


def test_partners_spread_and_protection_is_rebuilt_after_a_failover(lab3: labmod.LabState, guest_image) -> None:
    """Two level 2 VMs and one level 3 VM on h1: their partners are spread over h2 and h3.
    h1 loses power: each VM carries on on its partner, and about partner_replace_after
    later gets a new replica on the remaining host, Protected again; the level 2 client
    loses nothing acknowledged, the level 3 client keeps its connection."""
    pool = LabPool(lab3)
    names = {"sa": Level.COMPONENT, "sb": Level.COMPONENT, "sc": Level.SYSTEM}
    ips = {n: topo.vm_addr(70 + i).split("/")[0] for i, n in enumerate(names)}
    clients: dict[str, LabClient] = {}
    try:
        for i, (n, level) in enumerate(names.items()):
            pool.define_ledger_vm(n, 70 + i, level, guest_image, host="h1")
            pool.wait_running(n, 60)
            pool.wait_answering(ips[n], 60)
            pool.wait_for(f"{n} protected", lambda s, n=n: protection(s, s.vms[n]).protected, 120)
        snap = pool.snapshot()
        partners = {n: snap.vms[n].copies.partner_of("h1") for n in names}  # type: ignore[union-attr]
        assert set(partners.values()) == {"h2", "h3"}, partners  # spread, not all on one host
        for n in ("sa", "sc"):
            clients[n] = LabClient(lab3, ips[n], n, 0.02, reply_timeout=90)
            clients[n].wait_acks(20, 30)
        t = labmod.fail_host(lab3, "h1")
        for n in names:
            new_host = partners[n]
            third = ({"h2", "h3"} - {new_host}).pop()
            assert pool.wait_running(n, 60, not_on="h1") == new_host
            pool.wait_for(f"{n} protected again with {third}", protected_with(n, third), 120)
        rebuilt = [e for e in pool.events() if e.kind == "replace-partner" and e.time > t]
        assert {e.vm for e in rebuilt} == set(names), rebuilt
        for c in clients.values():
            c.wait_acks(20, 30, after=time.time())
        acks = clients["sa"].stop()
        host = pool.snapshot().vms["sa"].owner.host  # type: ignore[union-attr]
        raw = pool.copy_as_raw("sa", host, Path(lab3.dir) / "sa.raw")
        assert check_acked_on_disk(raw, acks)[1] == []
        l3 = clients["sc"].stop()
        assert [e.get("kind") for e in clients["sc"].other_events()] == ["connect"]
        assert sequence_breaks(l3) == (0, 0)
    finally:
        for c in clients.values():
            c.stop()
        for h in list(lab3.failed):
            labmod.restore_host(lab3, h)
        for n in names:
            pool.stop_and_remove(n)


def test_overcommit_is_refused_and_changes_nothing(lab3: labmod.LabState, guest_image) -> None:
    """Three 1900 MiB VMs fill the three 2048 MiB hosts: starting a fourth is refused with
    what is free, and it stays stopped."""
    from ftvm.core.model import Desired
    pool = LabPool(lab3)
    labmod.wait_for_hosts(lab3, lab3.hosts, 60)
    names = [f"huge{i}" for i in range(4)]
    try:
        for i, n in enumerate(names):
            pool.define_ledger_vm(n, 76 + i, Level.RESTART, guest_image, memory_mib=1900, start=i < 3)
        for n in names[:3]:
            pool.wait_running(n, 60)
        with pytest.raises(FtvmError, match="overcommit: huge3 needs 1900 MiB") as e:
            pool.run(lambda s: ops.set_desired(s, "huge3", Desired.RUNNING))
        assert "h1 148 MiB" in str(e.value)
        assert pool.snapshot().vms["huge3"].spec.desired is Desired.STOPPED
    finally:
        for n in names:
            pool.stop_and_remove(n)
