"""A real DR failover to another pool (`lab up --dr`: pool "dr" with its own etcd, host h9,
behind a WAN link of 40 ms and 150 Mbit/s), as `ftvm demo --dr` runs it (lab/dr_story.py).
The main site loses power under load; the DR pool refuses a failover without
--accept-data-loss, then starts the VM from its newest point once the main site has been
silent for its dr_confirm + 10 s, stating the loss; exactly the records acknowledged after
the point are lost; the client finds the VM on the same address. The main site comes back,
asks its DR site before starting the VM, hears "failed over", and never starts it."""

from __future__ import annotations

import pytest

from ftvm import ops
from ftvm.core.model import Desired
from ftvm.errors import FtvmError
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.dr_story import dr_story
from ftvm.lab.scenario import LabPool

VM = "books"


def test_the_dr_pool_takes_over_a_lost_site_and_the_site_never_runs_the_vm_again(lab_dr: labmod.LabState,
                                                                                   guest_image) -> None:
    lab = lab_dr
    main, dr = LabPool(lab), LabPool(lab, dr=True)
    try:
        story = dr_story(main, guest_image, progress=print, vm=VM)
        print(story.to_json())
        assert story.ok, story
        assert story.acknowledged >= 50 and story.lost_before_cut == 0
        # the writes after the cut (the client wrote every 20 ms until the loss) are lost and said so
        assert story.lost > 0 and "loses the writes after" in story.loss_statement
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
    finally:
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
