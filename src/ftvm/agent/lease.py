"""The host lease: this host's membership of the pool, and the heart of fencing.

etcd forgets a host `lease_ttl` after the last keepalive it received; another host may
then start its VMs. So the lease is renewed every `keepalive_interval`, and each renewal
re-arms the fence guard (agent/fence.py) to kill every VM here `self_fence_margin`
before the lease could expire, counted from when the renewal was *sent*. The renewal
loop must outlive any error: if it ended, the guard would kill every VM here.

The lease outlives the agent: an agent that starts while etcd still holds its
predecessor's lease (a restart, an upgrade) renews that lease, so the VMs their keepers
kept running stay owned here (agent/adoption.py). A lease etcd has expired means the
keepers have already killed those VMs (their deadline comes first): the agent takes a
new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..core.model import HostInfo
from ..core.timing import Timing
from ..store.etcd import EtcdClient, EtcdError
from ..store.pool import PoolStore
from ..qemu.keeper import read_deadline
from .fence import FenceGuard
from .journal import Journal

log = logging.getLogger("ftvm.agent")


class AgentStartError(RuntimeError):
    pass


class HostLease:
    def __init__(self, etcd: EtcdClient, store: PoolStore, host: str, pool: str, state_dir: Path, timing: Timing,
                 info: Callable[[int], HostInfo], guard: FenceGuard, journal: Journal,
                 wake: Callable[[], None]) -> None:
        """`info(lease)`: this host's record, published under the lease."""
        self.etcd, self.store, self.host, self.pool, self.t = etcd, store, host, pool, timing
        self._file = state_dir / "lease.json"
        self.info, self.guard, self.journal, self.wake = info, guard, journal, wake
        self.id = 0
        self.ttl = 0
        self.quorum_ok = True
        self.resumed = False  # the lease is the previous agent's: its VMs may still run here

    async def acquire(self) -> None:
        """Take the host lease: the previous agent's (recorded in state_dir) if etcd still
        holds it, so the VMs it ran, which their keepers kept running, stay this host's
        (`resumed`); else a new one."""
        try:
            old = json.loads(self._file.read_text())["lease"]
        except (OSError, ValueError, KeyError, TypeError):
            old = 0
        kv = await self.etcd.get(self.store.host_key(self.host))
        if kv is not None and old and kv.lease == old:
            sent = time.monotonic()
            ttl = await self.etcd.lease_keepalive(old)
            if ttl > 0:
                before = read_deadline(self.guard.deadline_file) if self.guard.deadline_file else None
                if before is not None and before[0] == old:
                    log.info("kept the previous agent's host lease %x, %.2f s before the keepers would have "
                             "fenced its VMs", old, before[1] - sent)
                self.id, self.ttl, self.resumed = old, ttl, True
                self.guard.arm(sent + ttl - self.t.self_fence_margin, old)
                await self.store.register_host(self.info(old), old)  # (this version's record)
                return
        lease, ttl = await self.etcd.lease_grant(self.t.lease_ttl)
        sent = time.monotonic()
        # the lease becomes the agent's only once the host is registered under it
        if not await self.store.register_host(self.info(lease), lease):
            await self.etcd.lease_revoke(lease)
            raise AgentStartError(f"another agent is live as host {self.host} in pool {self.pool}")
        self._file.write_text(json.dumps({"lease": lease}))
        self.id, self.ttl, self.resumed = lease, ttl, False
        self.guard.arm(sent + ttl - self.t.self_fence_margin, lease)

    async def join(self) -> None:
        """Acquire the host lease, retrying until the quorum service answers."""
        while True:
            try:
                await self.acquire()
                return
            except (EtcdError, AgentStartError) as e:
                log.error("cannot join the pool yet: %s; retrying", e)
                await asyncio.sleep(max(1.0, self.t.keepalive_interval))

    async def keep_alive(self) -> None:
        """Renews the lease until cancelled, whatever goes wrong."""
        while True:
            try:
                pause = await self.renew()
            except Exception as e:  # noqa: BLE001 - the loop must go on; the error is logged
                self.journal.loop_error("keepalive", e)
                pause = self._soon()
            await asyncio.sleep(pause)

    def _soon(self) -> float:
        """When to try again after a failed renewal: well before the guard fires."""
        return min(self.t.keepalive_interval, max(0.05, self.guard.remaining() / 2))

    async def renew(self) -> float:
        """One renewal; returns how long to wait before the next. A lease etcd already
        forgot means every VM here is being killed (the guard); the host joins again."""
        try:
            ttl = await self._keepalive()
        except EtcdError as e:
            if self.quorum_ok:
                self.quorum_ok = False
                log.warning("quorum service unreachable (%s); fencing in %.1fs unless it returns",
                            e, self.guard.remaining())
            return self._soon()
        if ttl <= 0:
            log.error("host lease expired in etcd: fencing all VMs, then rejoining")
            self.guard.disarm()
            self.journal.event("", "fence", "host lease expired: all VMs killed before any other host "
                                            "could start them")
            await self.join()
            self.wake()
        elif not self.quorum_ok:
            self.quorum_ok = True
            self.journal.event("", "quorum", "quorum service reachable again")
            self.wake()
        return self.t.keepalive_interval

    async def _keepalive(self) -> int:
        """One keepalive; a lease etcd still holds moves the fence deadline on. Returns
        etcd's TTL (<= 0: the lease is gone). EtcdError is the caller's."""
        sent = time.monotonic()
        ttl = await self.etcd.lease_keepalive(self.id)
        if ttl > 0:
            self.guard.arm(sent + self.ttl - self.t.self_fence_margin, self.id)
        return ttl

    async def renew_for_successor(self) -> None:
        """An agent leaving its VMs to the next one (SIGUSR2): one last renewal, so the next
        agent has the whole lease (less the fence margin) from now on to take it over before
        the keepers fence. Nothing else: a lease etcd has dropped is the next agent's to find."""
        try:
            await self._keepalive()
        except EtcdError as e:
            log.warning("could not renew the host lease before leaving (%s): the next agent has "
                        "%.1f s to take it over", e, self.guard.remaining())

    async def revoke(self) -> None:
        """Orderly stop: peers may take over this host's VMs at once."""
        await self.etcd.lease_revoke(self.id)
