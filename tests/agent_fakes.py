"""What the agent's rooms need from the agent, for tests that drive a room alone: a
journal that records events, and a host context on a real store under a given lease."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from ftvm.agent.context import HostContext
from ftvm.core.model import PoolSnapshot
from ftvm.core.timing import Timing
from ftvm.store.pool import PoolStore


@dataclass
class Journal:
    seen: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)

    def event(self, vm: str, kind: str, message: str, at: float | None = None) -> None:
        self.seen.append((kind, message))


def host_context(me: str, store: PoolStore, lease: int, journal: Journal,
                 latest: Callable[[], PoolSnapshot | None]) -> HostContext:
    """`me` holding `lease` (no renewal: the test's lease outlives it)."""
    return HostContext(me, store, SimpleNamespace(id=lease), journal,  # type: ignore[arg-type]
                       latest, lambda: None, Timing())
