"""When a guest that failed on its own is restarted, and when ftvm stops trying (pure).

A guest fails when its kernel panics (QEMU's pvpanic device: GUEST_PANICKED), when its
watchdog fires (WATCHDOG: QEMU has reset it already), or when its health probe goes
unanswered. The host is fine: the VM restarts where it runs, at every level (at level 3
the crash is in the replica too, so a takeover would only replay it).

Restarts are limited in the manner of vSphere's VM monitoring: at most `max_restarts` per
`window_s`. The failure past that leaves the VM stopped with the reason in its record
(`vms/<vm>/guest`, written by the owner under its fencing token, kept across hosts), and no
host starts it again until an operator does (`ftvm vm start`, which clears the record).
"""

from __future__ import annotations

from dataclasses import dataclass

from .records import RecordError, as_object, check_version, from_fields

GUEST = "guest "  # the cause of a guest's own failure starts so (events, availability records)
PANIC = GUEST + "kernel panic"
WATCHDOG = GUEST + "watchdog"
PROBE = GUEST + "health probe"
MAX_KEPT = 32  # failures a record keeps (the window's; a policy never allows more restarts)


@dataclass(frozen=True)
class GuestFailure:
    at: float     # wall-clock time
    cause: str    # PANIC, WATCHDOG, or "health probe: <what failed>"
    host: str


@dataclass(frozen=True)
class GuestRecord:
    """`vms/<vm>/guest`: the guest's recent failures, and whether ftvm gave up on it."""

    failures: tuple[GuestFailure, ...] = ()
    gave_up: str = ""   # why the VM is left stopped ("" while failures are restarted)

    def to_json(self) -> dict[str, object]:
        return {"v": 1, "failures": [f.__dict__ for f in self.failures], "gave_up": self.gave_up}

    @staticmethod
    def from_json(d: object) -> GuestRecord:
        """RecordError if it is not a guest record this version can read."""
        obj = as_object(d, "guest")
        check_version(obj, "guest")
        raw = obj.get("failures", [])
        if not isinstance(raw, list) or len(raw) > MAX_KEPT:
            raise RecordError(f"guest.failures: expected a list of at most {MAX_KEPT}")
        failures = tuple(from_fields(GuestFailure, f, f"guest.failures[{i}]") for i, f in enumerate(raw))
        gave_up = obj.get("gave_up", "")
        if not isinstance(gave_up, str) or len(gave_up) > 1000:
            raise RecordError("guest.gave_up: expected a short text")
        return GuestRecord(failures, gave_up)


@dataclass(frozen=True)
class GuestPolicy:
    max_restarts: int = 3
    window_s: float = 3600.0


@dataclass(frozen=True)
class Verdict:
    restart: bool          # False: leave the VM stopped (the limit is reached)
    record: GuestRecord    # what to write
    reason: str            # for the event log and the status


def failure_of(event: str) -> str | None:
    """The guest failure a QEMU event reports, if any (GUEST_PANICKED: the pvpanic device;
    WATCHDOG: the watchdog device fired, and QEMU reset the guest)."""
    return {"GUEST_PANICKED": PANIC, "WATCHDOG": WATCHDOG}.get(event)


def _span(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def on_guest_failure(seen: GuestRecord | None, failure: GuestFailure, policy: GuestPolicy) -> Verdict:
    """One more failure: restart the guest, or give up (more than `max_restarts` failures
    restarted within `window_s`)."""
    earlier = [f for f in (seen.failures if seen else ()) if failure.at - f.at < policy.window_s]
    recent = (*earlier, failure)[-MAX_KEPT:]
    if len(recent) > policy.max_restarts:
        why = (f"guest failed {len(recent)} times in {_span(policy.window_s)} (last: {failure.cause} on "
               f"{failure.host}); restarts stopped after {policy.max_restarts}: `ftvm vm start` tries again")
        return Verdict(False, GuestRecord(tuple(recent), why), why)
    return Verdict(True, GuestRecord(tuple(recent)),
                   f"{failure.cause}: guest restarted on {failure.host} "
                   f"({len(recent)} of {policy.max_restarts} restarts in {_span(policy.window_s)})")
