"""Level 2 copies of a VM's disks: which host holds a current copy, and the rules
for changing that (pure).

One record per VM (`vms/<vm>/copies` in the store):

    {"gen": 7, "copies": {"h1": {"state": "current", ...}, "h2": {"state": "outdated", ...}}}

A copy is *current* when it holds every write the guest was ever told was
done. Rules:
  * a host may start the VM only from a current copy (never promote a stale one),
    unless an operator forces it, accepting data loss;
  * a copy stops being current, with `gen` bumped, *before* the guest is allowed
    to complete a write that the copy lacks (the agent keeps the VM stopped until
    the record is committed);
  * an outdated copy becomes current again only after a resync with the VM
    stopped for its last pass.

`full` says whether a resync must copy the whole disk: after a failover the
old primary may hold writes that were never acknowledged (in flight when it
died) and no bitmap knows where they are, so it is resynced in full. A copy
outdated while the primary kept running is resynced from the primary's dirty
bitmap (only what was written while apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from .model import valid_name
from .records import MAX_ITEMS, RECORD_VERSION, RecordError, as_object, check_version, from_fields


class CopyState(str, Enum):
    CURRENT = "current"
    OUTDATED = "outdated"
    SYNCING = "syncing"
    FAILED = "failed"  # the storage under it failed; needs a full resync after repair


@dataclass(frozen=True)
class Copy:
    state: CopyState
    since: float
    reason: str = ""
    full: bool = False  # the next resync must copy everything

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "since": self.since, "reason": self.reason, "full": self.full}

    @staticmethod
    def from_json(d: object, what: str = "copy") -> "Copy":
        return from_fields(Copy, d, what)


@dataclass(frozen=True)
class Copies:
    gen: int
    copies: dict[str, Copy] = field(default_factory=dict)
    revision: int = 0  # etcd mod_revision of the record (0: not stored yet)

    def to_json(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, "gen": self.gen,
                "copies": {h: c.to_json() for h, c in sorted(self.copies.items())}}

    @staticmethod
    def from_json(d: object, revision: int = 0) -> "Copies":
        obj = as_object(d, "copies")
        check_version(obj, "copies")
        hosts = obj.get("copies")
        if not isinstance(hosts, dict) or len(hosts) > MAX_ITEMS:
            raise RecordError("copies.copies: expected an object of hosts")
        if not all(valid_name(h) for h in hosts):
            raise RecordError(f"copies.copies: invalid host name among {sorted(map(repr, hosts))[:4]}")
        copies = {h: Copy.from_json(c, f"copies.{h}") for h, c in hosts.items()}
        return from_fields(Copies, obj, "copies", copies=copies, revision=revision)

    def current_hosts(self) -> list[str]:
        return sorted(h for h, c in self.copies.items() if c.state is CopyState.CURRENT)

    def partner_of(self, primary: str) -> str | None:
        others = sorted(h for h in self.copies if h != primary)
        return others[0] if others else None

    def state_of(self, host: str) -> Copy | None:
        return self.copies.get(host)


NEW_DISK = "new disk"
IMPORTED = "imported from an image"
NEW_REPLICA = "new replica, not yet connected"


def new_copies(primary: str, partner: str | None, now: float, imported: bool = False) -> Copies:
    """First start. Empty disks: both copies are the same zeroes, so the partner's is
    resynced from the bitmap the primary starts with (what the guest wrote since).
    An imported image exists only on the primary: the partner's copy is resynced in full."""
    copies = {primary: Copy(CopyState.CURRENT, now, IMPORTED if imported else NEW_DISK)}
    if partner is not None:
        copies[partner] = Copy(CopyState.OUTDATED, now, NEW_REPLICA, full=imported)
    return Copies(1, copies)


def needs_full_resync(copy: Copy, fresh_image: bool) -> bool:
    """A partner that had to create an empty image lost whatever its copy held: unless
    it is the brand-new replica of an empty disk, only a full resync is right."""
    return copy.full or copy.state is CopyState.FAILED or (fresh_image and copy.reason != NEW_REPLICA)


def brand_new_on(copies: Copies | None, host: str) -> bool:
    """Whether `host`'s copy is the first one of a brand-new VM (empty, or to be imported from
    an image): the only case where a start may make the copy instead of finding it."""
    mine = copies.state_of(host) if copies else None
    return mine is not None and mine.state is CopyState.CURRENT and mine.reason in (NEW_DISK, IMPORTED)


def may_start_on(copies: Copies | None, host: str) -> tuple[bool, str]:
    """Whether `host` may run the VM from its copy, and why not."""
    if copies is None:
        return True, "new VM"
    c = copies.state_of(host)
    if c is None:
        return False, f"{host} holds no copy of the disks"
    if c.state is not CopyState.CURRENT:
        return False, f"copy on {host} is {c.state.value} ({c.reason}) since gen {copies.gen}"
    return True, f"copy on {host} is current (gen {copies.gen})"


def mark(copies: Copies, host: str, state: CopyState, reason: str, now: float, full: bool = False) -> Copies:
    """A copy changes state; every change bumps the generation. A pending full
    resync stays pending until the copy is current again."""
    old = copies.copies.get(host)
    keep_full = old is not None and old.full and state is not CopyState.CURRENT
    c = Copy(state, now, reason, full or keep_full)
    return replace(copies, gen=copies.gen + 1, copies={**copies.copies, host: c})


def take_over(copies: Copies, new_primary: str, now: float, forced: bool = False) -> Copies:
    """A failover: every other copy may lack in-flight writes of the old primary
    -> outdated, resynced in full. A forced start also makes the new primary's copy
    the reference, whatever it lacked."""
    out = copies
    for h, c in copies.copies.items():
        if h != new_primary and c.state is not CopyState.FAILED:
            out = mark(out, h, CopyState.OUTDATED, f"{new_primary} took over", now, full=True)
    if forced:
        out = mark(out, new_primary, CopyState.CURRENT, "forced start: accepted data loss", now)
    return out


def start_primary(copies: Copies, primary: str, now: float) -> Copies:
    """A (re)start of the VM on `primary` that last ran there: a current copy is
    outdated first and resynced from the bitmap the primary starts with; a copy
    that was already behind is resynced in full (its bitmap died with the old QEMU)."""
    return _new_bitmap(copies, primary, now, f"VM started on {primary}; replica reconnecting")


def moved_copies(copies: Copies, new_primary: str, now: float) -> Copies:
    """A live migration handed the VM to `new_primary`, which runs on its own current
    copy. Every guest write reached both copies until the source paused with its I/O
    drained, so the old primary's copy is identical at the handover: outdated, and
    resynced from the bitmap the new primary starts before the guest continues (only
    what was written since the move). Copies that were already behind are resynced in
    full (the bitmap that knew their gap died with the source's QEMU)."""
    return _new_bitmap(copies, new_primary, now, f"VM moved live to {new_primary}; replica reconnecting")


def _new_bitmap(copies: Copies, primary: str, now: float, why_current: str) -> Copies:
    out = copies
    for h, c in copies.copies.items():
        if h == primary or c.state is CopyState.FAILED:
            continue
        if c.state is CopyState.CURRENT:
            out = mark(out, h, CopyState.OUTDATED, why_current, now)
        else:
            out = mark(out, h, CopyState.OUTDATED, f"VM restarted on {primary} while this copy was behind",
                       now, full=True)
    return out


def claim_copies(copies: Copies | None, me: str, last_host: str | None, partner: str | None,
                 now: float, forced: bool = False, imported: bool = False, migrated: bool = False) -> Copies:
    """The copies record written in the claim transaction of a level 2 VM, before the
    guest can write anything: every copy but the claimer's stops being current.
    `migrated`: a live migration handed the VM to `me` (the source checked, in the
    handover, that `me`'s copy was current)."""
    if copies is None:
        return new_copies(me, partner, now, imported)
    if migrated and not forced:
        return moved_copies(copies, me, now)
    if last_host not in (None, me) or forced:
        return take_over(copies, me, now, forced)
    return start_primary(copies, me, now)


def replace_partner(copies: Copies, old: str | None, new: str, now: float) -> Copies:
    """The partner `old` has been down too long (None: there was none): forget its copy and
    start a new replica on `new`, built in full (pools of 3-4 hosts: protection is rebuilt
    after a failover)."""
    kept = {h: c for h, c in copies.copies.items() if h != old}
    kept[new] = Copy(CopyState.OUTDATED, now, NEW_REPLICA, full=True)
    return Copies(copies.gen + 1, kept, copies.revision)
