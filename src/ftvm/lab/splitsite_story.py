"""SplitSite's story (`ftvm demo --splitsite`, `ftvm bench splitsite`): a level 3 and a level
2 VM run at site a with their partners at site b; site a loses power; site b, which still
reaches the quorum at the witness site, carries the level 3 VM on from its last checkpoint
with the client's connection open and restarts the level 2 VM from its copy; nothing
acknowledged is lost and at most one copy of either runs; site a comes back and both are
protected again (their replicas now at site a)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.model import Level
from ..guest.build import GuestImage
from . import lab as labmod
from . import topology as topo
from .client import Ack
from .observer import CopyObserver
from .scenario import (LabClient, LabPool, Progress, ScenarioError, check_acked_on_disk, l3_protected,
                       replica_current, sequence_breaks)


@dataclass
class SiteLossVm:
    vm: str
    level: int
    before: str               # host at site a
    after: str                # host at site b
    outage_s: float           # the client's longest wait between two replies, around the loss
    reply_after_loss_s: float  # the loss -> the client's next reply (may be one in flight at the loss)
    detection_s: float        # the loss -> site b's host took it (level 3: takeover; 1, 2: claim)
    connections: int          # TCP connections the client opened (1: kept through the loss)
    acknowledged: int
    lost: int                 # acknowledged records missing from the copy at site b
    seq_gaps: int
    max_copies: int           # most QEMUs running the guest at once (observed from outside)
    reprotect_s: float        # site a back -> protected again


@dataclass
class SplitSiteStory:
    sites: dict[str, str]     # host -> site
    rtt_ms: float             # the metro link's round trip during the story
    rate_mbit: float          # and its rate (0: unlimited)
    lease_ttl_s: float
    vms: list[SiteLossVm]

    @property
    def ok(self) -> bool:
        return all(v.lost == 0 and v.max_copies <= 1 and (v.level != 3 or v.connections == 1) for v in self.vms)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def longest_wait(acks: list[Ack], lost_at: float) -> float:
    """The longest time between two consecutive replies, the later one after the loss (a
    reply in flight at the loss does not count as the first one after it)."""
    times = sorted(a.t for a in acks)
    return round(max((b - a for a, b in zip(times, times[1:], strict=False) if b > lost_at), default=float("nan")), 3)


def _ip(index: int) -> str:
    return topo.vm_addr(index).split("/")[0]


def splitsite_story(pool: LabPool, image: GuestImage, progress: Progress = lambda m: None,
                    rtt_ms: float = 2.0, rate_mbit: float = 0.0, first_index: int = 90,
                    level1: bool = False) -> SplitSiteStory:
    """Run the story in a site lab (`lab up --sites 2`): the VMs start on the first host of
    site a, their partners at site b. `level1`: a level 1 VM too (its disk on the lab's
    shared storage, which both sites reach)."""
    state = pool.state
    site_a, site_b = labmod.site_hosts(state, "a"), labmod.site_hosts(state, "b")
    home = site_a[0]
    labmod.set_metro(state, rtt_ms, rate_mbit)
    rate = f"{rate_mbit:g} Mbit/s" if rate_mbit else "unlimited rate"
    progress(f"sites: a = {', '.join(site_a)}, b = {', '.join(site_b)}; the quorum (etcd) at a third site; "
             f"metro link {rtt_ms:g} ms round trip, {rate}")
    levels = {"trade": (first_index, Level.SYSTEM), "sales": (first_index + 1, Level.COMPONENT)}
    if level1:
        levels["web"] = (first_index + 2, Level.RESTART)
    for name, (index, level) in levels.items():
        pool.define_ledger_vm(name, index, level, image, host=home)
        progress(f"level {int(level)} VM {name} defined on {home} (site a)")
    for name, (index, level) in levels.items():
        pool.wait_running(name, 90)
        pool.wait_answering(_ip(index), 90)
        if level is Level.RESTART:
            continue
        pool.wait_for(f"{name} protected", l3_protected(name) if level is Level.SYSTEM else replica_current(name), 240)
        view = pool.snapshot().vms[name]
        partner = view.copies.partner_of(home) if view.copies else None
        if partner not in site_b:
            raise ScenarioError(f"{name}'s partner is {partner}, not at site b")
        progress(f"{name}: Protected, its partner {partner} at site b")
    observers = {name: CopyObserver(name).start() for name in levels}
    clients: dict[str, LabClient] = {}
    try:
        # level 3 keeps the connection; a restart (levels 1, 2) ends it, and a client whose
        # request the guest took but never answered waits for its own timeout (2 s here)
        clients = {name: LabClient(state, _ip(index), name, 0.02, reply_timeout=120 if level is Level.SYSTEM else 2)
                   for name, (index, level) in levels.items()}
        for c in clients.values():
            c.wait_acks(50, 60)
        progress("clients writing to both; site a loses power (every host there at once)")
        lost_at = labmod.fail_site(state, "a")
        after = {}
        for name in levels:
            after[name] = pool.wait_running(name, 120, not_on=home)
            clients[name].wait_acks(1, 120, after=lost_at)
            progress(f"{name} runs at {after[name]} (site b) and answers")
        for c in clients.values():
            c.wait_acks(50, 60, after=time.time())
        progress("site a powers on again: its hosts rejoin and become the replicas")
        back_at = time.time()
        labmod.restore_site(state, "a")
        labmod.wait_for_hosts(state, state.hosts, 90)
        reprotect = {}
        for name, (_, level) in levels.items():
            if level is Level.RESTART:
                reprotect[name] = 0.0
                continue
            pool.wait_for(f"{name} protected again", l3_protected(name) if level is Level.SYSTEM
                          else replica_current(name), 300)
            reprotect[name] = round(time.time() - back_at, 1)
            progress(f"{name}: Protected again after {reprotect[name]:.0f} s")
        for c in clients.values():
            c.wait_acks(20, 60, after=time.time())
    finally:
        acks = {name: c.stop() for name, c in clients.items()}
        for o in observers.values():
            o.stop()
    results = []
    events = pool.events()
    for name, (_, level) in levels.items():
        got = acks[name]
        kind = "takeover" if level is Level.SYSTEM else "claim"
        took = [e.time for e in events if e.vm == name and e.kind == kind and e.time > lost_at]
        if level is Level.SYSTEM:
            image_path = pool.copy_path(name, after[name])[0]
        elif level is Level.RESTART:
            image_path = Path(pool.snapshot().vms[name].spec.disks[0].path)
        else:
            image_path = pool.copy_as_raw(name, after[name], Path(state.dir) / f"{name}-check.raw")
        _, lost = check_acked_on_disk(image_path, got)
        connects = [e for e in clients[name].other_events() if e.get("kind") == "connect"]
        first_after = min((a.t for a in got if a.t > lost_at), default=float("nan"))
        results.append(SiteLossVm(
            vm=name, level=int(level), before=home, after=after[name], outage_s=longest_wait(got, lost_at),
            reply_after_loss_s=round(first_after - lost_at, 3),
            detection_s=round(min(took) - lost_at, 3) if took else float("nan"),
            connections=len(connects), acknowledged=len(got),
            lost=len(lost), seq_gaps=sequence_breaks(got)[0], max_copies=observers[name].max_copies,
            reprotect_s=reprotect[name]))
        progress(f"{name}: {len(got)} acknowledged records checked on {after[name]}'s copy, {len(lost)} lost")
    return SplitSiteStory(sites=dict(state.sites), rtt_ms=rtt_ms, rate_mbit=rate_mbit,
                          lease_ttl_s=state.timing["lease_ttl"], vms=results)
