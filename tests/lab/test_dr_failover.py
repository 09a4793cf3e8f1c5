"""A real DR failover to another pool (`lab up --dr`: pool "dr" with its own etcd, host h9,
behind a WAN link of 40 ms and 150 Mbit/s). The main site loses power under load; the DR
pool starts the VM from its newest point, stating the loss; the client finds it on the
same address; exactly the records acknowledged after the point are lost. The main site
comes back and never starts the VM again: its DR site tells it the VM was failed over."""

from __future__ import annotations

import time

import pytest

from ftvm import ops
from ftvm.core.model import Desired, Level
from ftvm.errors import FtvmError
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, replica_current

VM, INDEX = "web", 91
DISK = 64 << 20


def test_the_dr_pool_takes_over_a_lost_site_and_the_site_never_runs_the_vm_again(lab_dr: labmod.LabState) -> None:
    lab = lab_dr
    main, dr = LabPool(lab), LabPool(lab, dr=True)
    labmod.set_wan(lab, 40.0, 150.0)
    receivers = [topo.dr_receiver(h) for h in lab.dr_hosts]
    main.run(lambda s: ops.set_dr_target(s, "dr", receivers))
    from ftvm.guest.build import build_guest
    image = build_guest(log=lambda m: None)
    main.define_ledger_vm(VM, INDEX, Level.COMPONENT, image, host="h1", disk_size=DISK, dr_target="dr",
                          dr_rpo_s=6.0)
    ip = topo.vm_addr(INDEX).split("/")[0]
    try:
        main.wait_running(VM, 90)
        main.wait_answering(ip, 60)
        main.wait_for("replica in sync", replica_current(VM), 120)
        client = LabClient(lab, ip, VM, 0.02)
        try:
            client.wait_acks(30, 30)
            dr.wait_for("points at the DR pool", lambda s: ("lab", VM) in s.dr_replicas
                        and len(s.dr_replicas[("lab", VM)].points) >= 2, 90)
            client.wait_acks(30, 30, after=time.time())
            lost_at = time.time()  # the main site loses power under load
            for h in lab.hosts:
                labmod.fail_host(lab, h)
        finally:
            acks = client.stop()
        assert acks and max(a.t for a in acks) <= lost_at + 0.5
        # at the DR pool: without --accept-data-loss, refused with what would be lost
        with pytest.raises(FtvmError) as refused:
            dr.run(lambda s: ops.dr_failover(s, VM))
        assert "loses the writes after" in str(refused.value) and "--accept-data-loss" in str(refused.value)
        assert VM not in dr.snapshot().vms
        failover = dr.run(lambda s: ops.dr_failover(s, VM, accept_data_loss=True))
        assert failover.host == "h9" and "loses" in failover.loss
        assert dr.wait_running(VM, 120) == "h9"  # once the site was silent for its dr_confirm + 10 s
        main_silent = time.time() - lost_at
        assert main_silent >= 15.0, main_silent
        replica = dr.snapshot().dr_replicas[("lab", VM)]
        assert replica.failed_over
        cut = next(p.taken_at for p in replica.points if p.number == failover.point)
        dr.wait_answering(ip, 60)  # the same address, now across the WAN
        assert dr.ask(ip, "P") == "PONG"
        # exactly the records acknowledged after the point's cut are lost
        dr.stop_and_remove(VM)  # (its images stay)
        image_path = lab.host_dir("h9") / "local" / "dr-failovers" / "lab" / VM / "disk-0.raw"
        _, lost = check_acked_on_disk(image_path, acks)
        before = [a for a in acks if a.t < cut]
        assert before and not [a for a in lost if a.t < cut], [a for a in lost if a.t < cut][:3]
        assert all(a.t > cut - 0.5 for a in lost)
        events = [e.message for e in dr.events() if e.vm == VM and e.kind == "dr-failover"]
        assert events and "loses" in events[-1], events
        print(f"DR failover: point {failover.point} cut {lost_at - cut:.1f} s before the loss; {len(lost)} of "
              f"{len(acks)} acknowledged records lost (all after the cut); {failover.loss}")

        # the main site comes back: it asks its DR site before starting the VM, hears that it
        # was failed over, and never starts it
        for h in lab.hosts:
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 60)
        snap = main.wait_for("the VM marked failed over", lambda s: bool(s.vms[VM].spec.dr_failed_over), 90)
        view = snap.vms[VM]
        assert view.owner is None and view.spec.desired is Desired.STOPPED
        assert any(e.kind == "dr-failover" and e.vm == VM for e in main.events())
        with pytest.raises(FtvmError, match="failback"):
            main.run(lambda s: ops.set_desired(s, VM, Desired.RUNNING))
        main.wait_ticks(lab.hosts, 3)
        assert main.snapshot().vms[VM].owner is None
        assert not _qemu_of(lab, VM), "the old site started the VM again"
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 60)
        main.stop_and_remove(VM)
        main.run(lambda s: ops.remove_dr_target(s, "dr"))


def _qemu_of(lab: labmod.LabState, vm: str) -> list[int]:
    """QEMU processes of `vm` on the main site's hosts (observed from outside the agents)."""
    found = []
    for h in lab.hosts:
        for pid in labmod.ns_pids(topo.host_ns(h)):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if any(b"qemu-system" in c for c in cmdline[:1]) and any(vm.encode() in c for c in cmdline):
                found.append(pid)
    return found
