"""Recovery points at the DR site: which to keep, and how far behind the DR copy is (pure).

A recovery point is a crash-consistent cut across all of a VM's disks, taken at one
instant on the owner and committed whole at the DR site (dr/journal.py). Points are
numbered in the order they were taken; each holds the blocks written since the one
before it, so point n alone is not an image: base + points up to n are.

Retention, in the manner of Zerto's journal and vSphere Replication's instances:

    every point                  for `all_for_s` (default 1 h)
    then the newest in each hour for `hourly_for_s` (default 7 d)
    older                        consolidated into the base image (never listed)

plus always the newest point, and every point marked as tested while it is within the
hourly window. A point dropped from the middle is merged into the next one kept (its
blocks that the next one does not overwrite move there), so every kept point stays an
exact image of its instant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .model import DrReplica

HOUR_S = 3600.0


@dataclass(frozen=True)
class Retention:
    all_for_s: float = HOUR_S
    hourly_for_s: float = 7 * 24 * HOUR_S

    def problem(self) -> str | None:
        if not 0 < self.all_for_s <= self.hourly_for_s:
            return (f"retention: every point kept for {self.all_for_s:g} s must be positive and at most "
                    f"the hourly window ({self.hourly_for_s:g} s)")
        if self.hourly_for_s > 366 * 24 * HOUR_S:
            return "retention: at most a year of hourly points"
        return None


@dataclass(frozen=True)
class PointInfo:
    number: int
    taken_at: float        # the instant of the cut, owner's clock (unix seconds)
    tested: bool = False   # a test failover ran from it


def to_keep(points: list[PointInfo], now: float, policy: Retention) -> set[int]:
    """The numbers of the points to keep; the others are merged forward (or, older than
    every kept one, into the base image)."""
    if not points:
        return set()
    ordered = sorted(points, key=lambda p: p.number)
    keep = {ordered[-1].number}
    newest_in_hour: dict[int, int] = {}
    for p in ordered:
        age = now - p.taken_at
        if age <= policy.all_for_s:
            keep.add(p.number)
        elif age <= policy.hourly_for_s:
            if p.tested:
                keep.add(p.number)
            newest_in_hour[int(p.taken_at // HOUR_S)] = p.number  # ordered: the last one wins
    keep.update(newest_in_hour.values())
    return keep


@dataclass(frozen=True)
class Consolidation:
    """What to do with the points not kept: `into_base` (older than every kept point),
    applied to the base image in order; `merges` (from, into): `from` folded into the next
    kept point `into`, whose blocks win."""

    into_base: tuple[int, ...]
    merges: tuple[tuple[int, int], ...]


def consolidation(numbers: list[int], keep: set[int]) -> Consolidation:
    ordered = sorted(numbers)
    kept = [n for n in ordered if n in keep]
    if not kept:
        return Consolidation(tuple(ordered), ())
    into_base = tuple(n for n in ordered if n < kept[0])
    merges = []
    for n in ordered:
        if n in keep or n < kept[0]:
            continue
        into = next(k for k in kept if k > n)  # the newest is always kept: one exists
        merges.append((n, into))
    # merged newest first within each target, so a later point's blocks override an earlier's
    merges.sort(key=lambda m: (m[1], -m[0]))
    return Consolidation(into_base, tuple(merges))


def lag_s(newest_committed_at: float | None, now: float, since: float) -> float:
    """How far behind the DR copy is: now minus the instant of the newest point committed
    there. With none yet, since replication was asked for (`since`)."""
    return max(0.0, now - (newest_committed_at if newest_committed_at is not None else since))


def dr_loss(replica: DrReplica, point: int, now: float) -> str:
    """What starting `point` at the DR site loses of the source's writes, in words: every
    write after its cut. Of those, the newer points kept here (exact), and after the newest,
    at least what the source was sending when it was last heard (the rest died with it)."""
    chosen = next(p for p in replica.points if p.number == point)
    newer = [p for p in replica.points if p.number > point]
    c = replica.contact
    parts = []
    if newer:
        changed = _size(sum(p.data_bytes for p in newer))
        parts.append(f"{len(newer)} newer point(s) kept here, up to {_when(newer[-1].taken_at)} "
                     f"({newer[-1].taken_at - chosen.taken_at:.1f} s of writes, {changed} of changed blocks)")
    heard = last_heard(replica)
    inflight = (f", {_size(c.in_flight_bytes)} of a point cut at {_when(c.in_flight_taken_at)} still arriving then"
                if c.in_flight_bytes else "")
    parts.append(f"its site was last heard at {_when(heard)} ({now - heard:.0f} s ago{inflight})")
    return f"loses every write after {_when(chosen.taken_at)}, {heard - chosen.taken_at:.1f} s or more: " + \
        "; ".join(parts)


def _when(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 10) % 10}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def last_heard(replica: DrReplica) -> float:
    """When the DR site last heard from the VM's source (a point's cut is a word from it too)."""
    return max(replica.contact.heard_at, replica.points[-1].taken_at if replica.points else 0.0)


def seconds_lost(replica: DrReplica, point: int) -> float:
    """Seconds of writes a failover to `point` loses, at least: its cut to the last word."""
    chosen = next(p for p in replica.points if p.number == point)
    return round(max(0.0, last_heard(replica) - chosen.taken_at), 1)
