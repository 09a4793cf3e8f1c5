"""A real DR failover to another pool (`lab up --dr`: pool "dr" with its own etcd, hosts h8, h9,
behind a WAN link of 40 ms and 150 Mbit/s), as `ftvm demo --dr` runs it (lab/dr_story.py).
The main site loses power under load; the DR pool refuses a failover without
--accept-data-loss, then starts the VM from its newest point once the main site has been
silent for its dr_confirm + 10 s, stating the loss, and raises it to level 2 there; exactly
the records acknowledged after the point are lost; the client finds the VM on the same
address. The main site comes back,
asks its DR site before starting the VM, hears "failed over", and never starts it. Then
the failback: the DR copy's writes go back (a diff against the old copy), a switchover,
and the VM runs at home again with every record the DR copy acknowledged."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import Desired
from ftvm.errors import FtvmError
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.dr_story import dr_story
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk
from ftvm.views import row_of

VM = "books"


def test_the_dr_pool_takes_over_a_lost_site_and_the_site_never_runs_the_vm_again(lab_dr: labmod.LabState,
                                                                                   guest_image) -> None:
    lab = lab_dr
    main, dr = LabPool(lab), LabPool(lab, dr=True)
    immutable: list[Path] = []
    try:
        story = dr_story(main, guest_image, progress=print, vm=VM)
        print(story.to_json())
        assert story.ok, story
        assert story.acknowledged >= 50 and story.lost_before_cut == 0
        # the writes after the cut (the client wrote every 20 ms until the loss) are lost and said so
        assert story.lost > 0 and "loses every write after" in story.loss_statement
        # the DR site heard the owner between points: the loss it stated is most of the real one
        assert story.point_age_at_loss_s - 1.5 <= story.stated_loss_s <= story.point_age_at_loss_s + 0.5, story
        assert story.running_at_dr_s >= story.dr_confirm_s + 10 - 1  # (it waited for the main site's silence)
        assert dr.snapshot().dr_replicas[("lab", VM)].failed_over
        assert dr.ask(topo.vm_addr(92).split("/")[0], "P") == "PONG"
        with pytest.raises(FtvmError, match="failed over to this pool already"):
            dr.run(lambda s: ops.dr_failover(s, VM, accept_data_loss=True))
        # the main site: never started again, and an operator's start is refused
        with pytest.raises(FtvmError, match="failback"):
            main.run(lambda s: ops.set_desired(s, VM, Desired.RUNNING))
        main.wait_ticks(lab.hosts, 3)
        assert main.snapshot().vms[VM].owner is None
        assert not _qemu_of(lab, VM), "the old site started the VM again"
        assert any(e.kind == "dr-failover" and e.vm == VM for e in main.events())
        assert any(e.kind == "dr-failover" and e.vm == VM and "loses" in e.message for e in dr.events())

        # failback: the DR copy's writes go back to h1 (a diff against its old copy there:
        # what changed, not the disk), then a switchover; nothing written at the DR site is lost
        ip = topo.vm_addr(92).split("/")[0]
        dr.run(lambda s: ops.set_dr_target(s, "home", [topo.dr_receiver("h1")]))
        client = LabClient(lab, ip, VM + "-back", 0.02)
        try:
            client.wait_acks(30, 60)
            with pytest.raises(FtvmError, match="failback .* --to"):
                dr.run(lambda s: ops.dr_failback(s, VM, switch=True))  # (the way back first)
            dr.run(lambda s: ops.dr_failback(s, VM, target="home", rpo_s=6.0))
            snap = dr.wait_for("the way back caught up", lambda s: (s.vms[VM].dr is not None and s.vms[VM].dr.newest
                                                                   and not s.vms[VM].dr.error), 120)
            first_back = snap.vms[VM].dr
            assert first_back is not None
            dr.wait_for("within the RPO", lambda s: bool((row_of(s, VM)["dr"] or {}).get("within_rpo")), 60)
            # h1's copy cannot be replaced (immutable, as a failing disk would refuse it): the
            # install fails, the last point stays at h1, and the install is tried again
            image, _ = main.copy_path(VM, "h1")
            subprocess.run(["chattr", "+i", str(image)], check=True)
            immutable.append(image)
            switched_at = time.time()
            dr.run(lambda s: ops.dr_failback(s, VM, switch=True))
            main.wait_events("the install failed", lambda e: e.vm == VM and e.kind == "error" and e.time > switched_at
                             and "installing its last point" in e.message, 120)
            assert VM not in {v for v, view in main.snapshot().vms.items() if view.owner is not None}
            subprocess.run(["chattr", "-i", str(image)], check=True)
            assert main.wait_running(VM, 180) == "h1"
            client.wait_acks(30, 120, after=time.time())
        finally:
            back = client.stop()
        print(f"failback: the first point back carried {first_back.data_bytes} bytes ({first_back.kind}); "
              f"switched over in {time.time() - switched_at:.0f} s")
        assert first_back.kind == "diff" and first_back.data_bytes < (64 << 20) // 4, first_back
        events = [e.message for e in main.events() if e.vm == VM and e.kind == "dr-failback"]
        assert events and "installed on h1" in events[-1], events
        # every record the client saw acknowledged, at the DR site and after, is on h1's copy
        _, lost = check_acked_on_disk(main.copy_as_raw(VM, "h1", Path(lab.dir) / "back.raw"), back)
        assert lost == [], lost[:3]
        dr.wait_for("the DR pool's copy gone, its replica taking points", lambda s: VM not in s.vms
                    and ("lab", VM) not in s.dr_failovers and not s.dr_replicas[("lab", VM)].failed_over, 120)
        main.wait_for("DR points from the home pool again", lambda s: s.vms[VM].dr is not None
                      and s.vms[VM].dr.newest > 0 and not s.vms[VM].dr.error, 120)
        assert not main.snapshot().vms[VM].spec.dr_failed_over
    finally:
        for path in immutable:
            subprocess.run(["chattr", "-i", str(path)])
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 60)


def _qemu_of(lab: labmod.LabState, vm: str) -> list[int]:
    """QEMU processes of `vm` on the main site's hosts (observed from outside the agents)."""
    found = []
    for h in lab.hosts:
        for pid in labmod.ns_pids(topo.host_ns(h)):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().split(b"\0")
            except OSError:
                continue
            if b"qemu-system" in cmdline[0] and any(vm.encode() in c for c in cmdline):
                found.append(pid)
    return found
