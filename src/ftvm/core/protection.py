"""Is a VM protected right now? Always answered with a reason when it is not."""

from __future__ import annotations

from dataclasses import dataclass

from .model import Desired, Level, PoolSnapshot, RunState, VmView


@dataclass(frozen=True)
class Protection:
    protected: bool
    reason: str

    def __str__(self) -> str:
        return "Protected" if self.protected else f"Not protected: {self.reason}"


def protection(snapshot: PoolSnapshot, view: VmView) -> Protection:
    spec = view.spec
    if spec.level is Level.UNPROTECTED:
        return Protection(False, "level 0 (unprotected)")
    if spec.desired is Desired.STOPPED:
        return Protection(False, "stopped")
    if view.owner is None or view.status is None or view.status.state is not RunState.RUNNING:
        return Protection(False, "not running")
    here = view.owner.host
    host = snapshot.hosts.get(here)
    if host is None or not host.can_reach(spec):
        return Protection(False, "disks are not on shared storage")
    spares = [h for h, info in snapshot.hosts.items()
              if h != here and info.can_reach(spec) and snapshot.has_room(h, spec)]
    if not spares:
        others = [h for h in snapshot.hosts if h != here]
        if not others:
            return Protection(False, "no other live host")
        return Protection(False, "no other live host has room and its shared storage")
    return Protection(True, f"restarts on {spares[0]} if {here} is lost")
