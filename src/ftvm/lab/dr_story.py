"""Disaster recovery's story (`ftvm demo --dr`): a level 2 VM at the main site ships recovery
points to the DR pool over a WAN link; the main site loses power under load; the DR pool
starts the VM from its newest point (`dr failover --accept-data-loss`), which states the
loss, and raises it to level 2 there; the records lost are exactly those acknowledged
after the point's cut; the client finds the VM on the same address; the main site comes
back and never runs the VM again.
Needs a lab with a DR site (`lab up --dr`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import ops
from ..core.model import Desired, Level
from ..dr.journal import Replica
from ..errors import FtvmError
from ..guest.build import GuestImage
from . import lab as labmod
from . import topology as topo
from .observer import CopyObserver
from .scenario import LabClient, LabPool, Progress, ScenarioError, check_acked_on_disk, replica_current

TARGET = "dr"


@dataclass
class DrStory:
    wan_rtt_ms: float
    wan_rate_mbit: float
    rpo_s: float
    dr_confirm_s: float
    points_before_loss: int
    point: int                 # the point failed over to
    point_age_at_loss_s: float  # the loss - its cut: the seconds of writes lost
    acknowledged: int          # records the client saw acknowledged before the loss
    lost: int                  # of those, missing from the point
    lost_before_cut: int       # acknowledged before the cut and missing (must be 0)
    kept_after_cut: int        # acknowledged just after the cut but in the point (written before it)
    loss_statement: str        # what `dr failover` said it loses
    stated_loss_s: float       # its seconds (a lower bound: the site's last message after the cut)
    running_at_dr_s: float     # the loss -> the VM runs at the DR pool (includes the wait for silence)
    first_reply_s: float       # the loss -> the DR copy answers the client
    protected_at_dr_s: float   # the loss -> it runs at level 2 in the DR pool (its replica current)
    old_site_fenced: bool      # back, the main site marked the VM failed over and did not start it
    max_copies: int            # most QEMUs running the guest at once, anywhere (observed from outside)

    @property
    def ok(self) -> bool:
        return (self.lost_before_cut == 0 and self.old_site_fenced and self.max_copies <= 1
                and self.acknowledged > 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def dr_story(main: LabPool, image: GuestImage, progress: Progress = lambda m: None, rtt_ms: float = 40.0,
             rate_mbit: float = 150.0, rpo_s: float = 6.0, index: int = 92, vm: str = "books") -> DrStory:
    state = main.state
    if not state.dr_hosts:
        raise ScenarioError("the DR story needs a lab with a DR site (`lab up --dr`)")
    dr = LabPool(state, dr=True)
    labmod.set_wan(state, rtt_ms, rate_mbit)
    receivers = [topo.dr_receiver(h) for h in state.dr_hosts]
    main.run(lambda s: ops.set_dr_target(s, TARGET, receivers))
    progress(f"DR pool '{labmod.DR_POOL}' ({', '.join(state.dr_hosts)}, its own etcd) behind a WAN link of "
             f"{rtt_ms:g} ms, {rate_mbit:g} Mbit/s; DR target '{TARGET}' = {', '.join(receivers)}")
    main.define_ledger_vm(vm, index, Level.COMPONENT, image, host=state.hosts[0], dr_target=TARGET, dr_rpo_s=rpo_s)
    ip = topo.vm_addr(index).split("/")[0]
    main.wait_running(vm, 120)
    main.wait_answering(ip, 90)
    main.wait_for(f"{vm} protected", replica_current(vm), 240)
    progress(f"level 2 VM {vm} runs on {state.hosts[0]}, mirrored to {state.hosts[1]}; a recovery point every "
             f"{rpo_s / 3:g} s to the DR pool (RPO {rpo_s:g} s)")
    observer = CopyObserver(vm).start()
    try:
        client = LabClient(state, ip, vm, 0.02)
        try:
            client.wait_acks(50, 60)
            dr.wait_for("points at the DR pool", lambda s: ("lab", vm) in s.dr_replicas
                        and len(s.dr_replicas[("lab", vm)].points) >= 3, 120)
            client.wait_acks(30, 60, after=time.time())
            progress("the client writes; the main site loses power (both hosts at once)")
            lost_at = time.time()
            for h in state.hosts:
                labmod.fail_host(state, h)
        finally:
            acks = client.stop()
        acks = [a for a in acks if a.t <= lost_at]
        replica = dr.snapshot().dr_replicas[("lab", vm)]
        try:
            dr.run(lambda s: ops.dr_failover(s, vm))
            raise ScenarioError("a failover without --accept-data-loss was not refused")
        except FtvmError as e:
            progress(f"at the DR pool, `dr failover {vm}` without --accept-data-loss: refused ({e})")
        asked = dr.run(lambda s: ops.dr_failover(s, vm, accept_data_loss=True, level=int(Level.COMPONENT)))
        progress(f"`dr failover {vm} --accept-data-loss`: point {asked.point} (the newest kept); it {asked.loss}")
        host = dr.wait_running(vm, 180)
        running_s = time.time() - lost_at
        failover = dr.wait_for("the failover record", lambda s: s.dr_failovers[("lab", vm)].started,
                               30).dr_failovers[("lab", vm)]
        progress(f"started from point {failover.point}: it {failover.loss}")
        dr.wait_answering(ip, 90)
        reply_s = time.time() - lost_at
        progress(f"{vm} runs at the DR pool on {host} ({running_s:.0f} s after the loss, of which "
                 f"{state.timing.get('dr_confirm', 60) + 10:g} s waiting for the main site's silence) "
                 f"and answers on its address {ip}")
        dr.wait_for(f"{vm} at level 2 in the DR pool", lambda s: s.vms[vm].spec.level is Level.COMPONENT
                    and replica_current(vm)(s), 300)
        protected_s = time.time() - lost_at
        partner = next(h for h in state.dr_hosts if h != host)
        progress(f"{vm} raised to level 2 at the DR pool, mirrored to {partner} ({protected_s:.0f} s after the loss)")
        cut = next(p.taken_at for p in dr.snapshot().dr_replicas[("lab", vm)].points if p.number == failover.point)
        point_image = Replica(state.host_dir(host) / "local" / "dr" / "lab" / vm).materialize(
            failover.point, Path(state.dir) / f"{vm}-point")[0]
        _, lost = check_acked_on_disk(point_image, acks)
        lost_before = [a for a in lost if a.t < cut]
        kept_after = [a for a in acks if a.t >= cut and a not in lost]
        progress(f"the point (cut {lost_at - cut:.1f} s before the loss) holds {len(acks) - len(lost)} of the "
                 f"{len(acks)} acknowledged records: {len(lost)} lost, every one acknowledged after the cut"
                 if not lost_before else f"{len(lost_before)} records acknowledged BEFORE the cut are missing")
        progress("the main site powers on again")
        for h in state.hosts:
            labmod.restore_host(state, h)
        labmod.wait_for_hosts(state, state.hosts, 90)
        snap = main.wait_for("the main site to hear that the VM was failed over",
                             lambda s: bool(s.vms[vm].spec.dr_failed_over), 120)
        main.wait_ticks(state.hosts, 3)
        fenced = main.snapshot().vms[vm].owner is None and snap.vms[vm].spec.desired is Desired.STOPPED
        progress(f"back, the main site asked its DR site before starting {vm}: {snap.vms[vm].spec.dr_failed_over}. "
                 "Not started; `vm start` is refused until a failback")
    finally:
        observer.stop()
    return DrStory(wan_rtt_ms=rtt_ms, wan_rate_mbit=rate_mbit, rpo_s=rpo_s,
                   dr_confirm_s=float(state.timing.get("dr_confirm", 60.0)),
                   points_before_loss=len(replica.points), point=failover.point,
                   point_age_at_loss_s=round(lost_at - cut, 2), acknowledged=len(acks), lost=len(lost),
                   lost_before_cut=len(lost_before), kept_after_cut=len(kept_after), loss_statement=failover.loss,
                   stated_loss_s=failover.lost_s,
                   running_at_dr_s=round(running_s, 1), first_reply_s=round(reply_s, 1),
                   protected_at_dr_s=round(protected_s, 1), old_site_fenced=fenced,
                   max_copies=observer.max_copies)
