"""Availability of one VM over a period, from its history records (pure).

The agents append a compact record whenever a VM's service starts or stops
(store: `history/<vm>/...`, kept by age, not trimmed with the event log):

    up       the guest runs (started, restarted, resumed from a checkpoint, migrated in)
    down     the guest stopped unasked on `host`: QEMU died, the guest itself failed (cause
             "guest ...": counted apart from host failures), the host was lost (written
             by the survivor, time = the best estimate of the loss: lease expiry minus
             TTL, or the takeover minus the silence the partner measured), a fence.
             A `down` from a host other than the one of the last `up` is ignored: that
             copy had already been replaced
    stopped  an operator stopped it (planned: not counted against availability)
    dr-over  its DR lag passed its RPO (the owner's word; `dr-back`: within it again). Each
    dr-back  owner that starts shipping says which first. Time over the RPO counts while up.

Availability = 1 - unplanned downtime / (period - planned downtime). An outage
is a `down` until the next `up`; a failover is an outage that ended on another
host. Time to recover = the outage's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .guest_failures import GUEST
from .records import from_fields


@dataclass(frozen=True)
class HistoryRecord:
    t: float
    kind: str          # up | down | stopped
    host: str
    cause: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "kind": self.kind, "host": self.host, "cause": self.cause}

    @staticmethod
    def from_json(d: object) -> HistoryRecord:
        return from_fields(HistoryRecord, d, "history record")


@dataclass(frozen=True)
class Outage:
    start: float
    end: float | None   # None: still down at the end of the period
    cause: str
    host_before: str
    host_after: str

    @property
    def failover(self) -> bool:
        return self.end is not None and bool(self.host_after) and self.host_after != self.host_before

    @property
    def guest(self) -> bool:
        """The guest failed on its own (panic, watchdog, health probe), the host was fine."""
        return self.cause.startswith(GUEST)

    def seconds(self, until: float) -> float:
        return (self.end if self.end is not None else until) - self.start


@dataclass
class Report:
    vm: str
    start: float
    end: float
    availability: float | None           # None: the VM was never meant to run in the period
    sla_target: float | None              # percent, e.g. 99.99
    meets_sla: bool | None
    unplanned_down_s: float
    planned_down_s: float
    outages: list[Outage] = field(default_factory=list)
    # asynchronous DR at the report's end: target, RPO, lag then (views.dr_row); None without DR
    dr: dict[str, Any] | None = None
    up_s: float = 0.0          # time it ran in the period
    dr_over_rpo_s: float = 0.0  # of that, time its DR lag was over its RPO

    @property
    def failovers(self) -> int:
        return sum(o.failover for o in self.outages)

    @property
    def guest_failures(self) -> int:
        return sum(o.guest for o in self.outages)

    def recover_times(self) -> list[float]:
        return [o.seconds(self.end) for o in self.outages if o.end is not None]

    def to_json(self) -> dict[str, Any]:
        times = self.recover_times()
        return {
            "vm": self.vm, "start": self.start, "end": self.end,
            "availability_percent": None if self.availability is None else round(100 * self.availability, 5),
            "sla_target_percent": self.sla_target, "meets_sla": self.meets_sla,
            "unplanned_down_s": round(self.unplanned_down_s, 3), "planned_down_s": round(self.planned_down_s, 3),
            "outages": [{"start": o.start, "end": o.end, "seconds": round(o.seconds(self.end), 3),
                         "cause": o.cause, "from": o.host_before, "to": o.host_after, "failover": o.failover,
                         "guest": o.guest}
                        for o in self.outages],
            "failovers": self.failovers,
            "guest_failures": self.guest_failures,
            "time_to_recover_max_s": round(max(times), 3) if times else None,
            "time_to_recover_mean_s": round(sum(times) / len(times), 3) if times else None,
            "dr": None if self.dr is None else {k: self.dr[k] for k in ("target", "rpo_s", "lag_s", "within_rpo")} | {
                "over_rpo_s": round(self.dr_over_rpo_s, 1),
                "rpo_met_percent": round(100 * (1 - self.dr_over_rpo_s / self.up_s), 3) if self.up_s else None},
        }


def report(vm: str, records: list[HistoryRecord], start: float, end: float,
           sla_target: float | None = None) -> Report:
    """Availability of `vm` in [start, end). Records may begin before `start`: the state at
    `start` is the last one before it."""
    records = sorted(records, key=lambda r: r.t)
    state, host, since = "unknown", "", start
    outages: list[Outage] = []
    open_outage: tuple[float, str, str] | None = None   # (start, cause, host before)
    unplanned = planned = up = dr_over_s = 0.0
    ever_up, dr_over = False, False

    def close(at: float) -> None:
        nonlocal unplanned, planned, up, dr_over_s
        lo, hi = max(since, start), min(at, end)
        if hi > lo:
            if state == "down":
                unplanned += hi - lo
            elif state in ("stopped", "unknown"):
                planned += hi - lo
            elif state == "up":
                up += hi - lo
                if dr_over:
                    dr_over_s += hi - lo

    for r in records:
        if r.t >= end:
            break
        if r.kind in ("dr-over", "dr-back"):
            close(r.t)
            since, dr_over = r.t, r.kind == "dr-over"
            continue
        if r.kind == "down" and host and r.host != host:
            continue  # a copy that had already been replaced died (fenced, killed): not an outage
        close(r.t)
        if r.kind == "down" and state != "down":
            open_outage = (r.t, r.cause, host or r.host)
        elif r.kind == "up":
            ever_up = True
            if open_outage is not None:
                if open_outage[0] < end and r.t >= start:
                    outages.append(Outage(max(open_outage[0], start), r.t, open_outage[1], open_outage[2], r.host))
                open_outage = None
            host = r.host
        elif r.kind == "stopped":
            if open_outage is not None:  # an operator stopped a VM that was down: the outage ends there
                if r.t >= start:
                    outages.append(Outage(max(open_outage[0], start), r.t, open_outage[1], open_outage[2], ""))
                open_outage = None
        state, since = r.kind, r.t
    close(end)
    if open_outage is not None:
        outages.append(Outage(max(open_outage[0], start), None, open_outage[1], open_outage[2], ""))
    meant_to_run = (end - start) - planned
    availability = None if meant_to_run <= 0 or not ever_up else max(0.0, 1 - unplanned / meant_to_run)
    meets = None if availability is None or sla_target is None else 100 * availability >= sla_target
    return Report(vm, start, end, availability, sla_target, meets, unplanned, planned, outages, up_s=up,
                  dr_over_rpo_s=dr_over_s)
