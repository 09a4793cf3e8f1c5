"""What the agent's rooms (replication, level 3, migration, level changes) need from it,
in one place: this host, the store, the host lease, the latest pool snapshot, the
journal; and, for work on one VM, that VM and the fencing token it is done under."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.model import PoolSnapshot, VmView
from ..core.timing import Timing
from ..store.pool import PoolStore
from .journal import Journal
from .lease import HostLease


@dataclass(frozen=True)
class HostContext:
    me: str
    store: PoolStore
    host_lease: HostLease
    journal: Journal
    latest: Callable[[], PoolSnapshot | None]  # the snapshot of the last tick
    wake: Callable[[], None]                   # run a tick soon
    timing: Timing

    @property
    def lease(self) -> int:
        return self.host_lease.id

    def for_vm(self, vm: str, token: int) -> VmContext:
        return VmContext(self, vm, token)


@dataclass(frozen=True)
class VmContext:
    host: HostContext
    vm: str
    token: int   # the fencing token every write about the VM is made under

    @property
    def me(self) -> str:
        return self.host.me

    @property
    def store(self) -> PoolStore:
        return self.host.store

    @property
    def lease(self) -> int:
        return self.host.lease

    def snapshot(self) -> PoolSnapshot | None:
        return self.host.latest()

    def view(self) -> VmView | None:
        """The VM as the last tick saw it."""
        snap = self.host.latest()
        return snap.vms.get(self.vm) if snap else None

    def event(self, kind: str, message: str) -> None:
        self.host.journal.event(self.vm, kind, message)
