"""The host agent: lease, reconcile loop, QEMU processes, events.

One agent per host. Each tick it reads the pool snapshot, asks the decision
core what to do (`core.decide`), does it, and reports what its VMs are doing.
Besides the tick, store changes (watch) and QEMU exits wake the loop early.

Safety lives in three places:
  * the host lease, renewed every `keepalive_interval`; the fence guard
    thread kills every VM `self_fence_margin` before it could expire;
  * the fencing token: START and status writes are transactions that
    succeed only while this host still owns the VM with that token;
  * the decision core kills any VM running here without valid ownership.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.decide import ACTIVE_STATES, Action, Decision, TickReport, decide
from ..core.placement import claim_plan
from ..core.restart import after_exit, backoff
from ..core.transitions import Transition, transition

from ..core.model import (Desired, HostInfo, Incoming, Level, LevelChange, LocalView, LocalVm, Migration,
                          PoolSnapshot, RunState, VmSpec, VmStatus)
from ..core.replication import (NEW_DISK, Copies, CopyState, mark, replace_partner)
from ..qemu.blockgraph import DiskGraph, LocalImage, local_only_start
from .paths import resolved_spec
from ..l3.channel import LinkConfig
from ..qemu.runas import RunAs
from ..qemu.tls import QemuTls
from ..secret import derive
from ..l3.standby import RAM_DIR_MARKER, make_guest_ram_dir, read_committed
from ..qemu.cmdline import Checkpointed, VmPaths, checkpointed_disk_nodes
from ..qemu.probe import Accel, choose_accel
from ..qemu.process import QemuError, QemuVm
from ..qemu.storage_daemon import (StorageDaemonError, ensure_image, restore_write_through)
from ..store.etcd import EtcdClient, EtcdError
from ..store.pool import HISTORY_DAYS, MAX_EVENTS, OwnershipLost, PoolStore
from .disks import HostDisks, IncomingDisks
from .exports import Exports
from .config import AgentConfig
from ..api.metrics import AgentCounters, AgentHealth
from . import levels, migration
from .fence import FenceGuard
from .context import HostContext
from .journal import Journal
from .lease import HostLease
from .l3 import L3Partner, L3Primary
from .replica import ReplicaManager

log = logging.getLogger("ftvm.agent")


@dataclass
class LocalRecord:
    """What this agent knows about a VM it runs (or ran)."""

    name: str
    token: int
    state: RunState
    qemu: QemuVm | None = None
    exit_code: int | None = None
    detail: str = ""
    reported: VmStatus | None = None
    since: float = field(default_factory=time.time)
    failures: int = 0       # consecutive starts that failed or died young
    retry_at: float = 0.0   # monotonic time before which no new start is tried
    replica: ReplicaManager | None = None  # level 2 data plane
    # copies a running 2 -> 0 lowering left this QEMU on: their nodes still skip flushes,
    # so they stay checked (_check_write_through) until the QEMU ends
    kept_write_through: list[LocalImage] = field(default_factory=list)
    incoming_disks: IncomingDisks | None = None  # level 2 migration target: the copy it opened
    l3: L3Primary | None = None            # level 3 checkpointing
    stop_hurry: asyncio.Event = field(default_factory=asyncio.Event)  # `vm stop --force` during a stop


EVENT_TRIM_INTERVAL = 300.0  # seconds between trims of the event log to its newest MAX_EVENTS
WRITE_THROUGH_CHECK_INTERVAL = 5.0  # seconds between checks that write-through copies still are
FAILBACK_RETRY_S = 30.0  # a failback migration is asked at most this often per VM


Handler = Callable[[Decision, PoolSnapshot], Awaitable[None]]
URGENT = frozenset({Action.KILL, Action.TAKE_OVER})


class Agent:
    def __init__(self, config: AgentConfig, run_as: RunAs | None = None) -> None:
        """`run_as`: the unprivileged user QEMU and the storage daemons run as (None: root)."""
        self.run_as = run_as
        self.cfg = config
        self.t = config.timing
        # keys of QEMU's NBD and migration TLS, derived from the pool secret (qemu/tls.py)
        self.qemu_tls = QemuTls.from_secret(config.pool_secret) if config.pool_secret else None
        self.etcd = EtcdClient(list(config.etcd), timeout=self.t.etcd_timeout,
                               tls=config.etcd_tls.client_context() if config.etcd_tls else None)
        self.store = PoolStore(self.etcd, config.pool)
        self.accel: Accel | None = None
        self.vms: dict[str, LocalRecord] = {}
        self.guard = FenceGuard(self.t.fence_check, self._on_fence)
        self.wake = asyncio.Event()
        self.snapshot: PoolSnapshot | None = None
        self.l3_partner: L3Partner | None = None       # level 3 standbys this host keeps
        self.counters = AgentCounters()
        self._api: Any = None                           # the REST API + /metrics runner
        self.journal = Journal(config.name, self.store, self.counters)
        self.disks = HostDisks(config, self.journal)
        self.event, self.history = self.journal.event, self.journal.history
        self.host_lease = HostLease(self.etcd, self.store, config.name, config.pool, config.state_dir, self.t,
                                    lambda lease: replace(self.info, lease_id=lease), self.guard, self.journal,
                                    self.wake.set)
        self.ctx = HostContext(config.name, self.store, self.host_lease, self.journal, lambda: self.snapshot,
                               self.wake.set, self.t)
        self.exports = Exports(config, self.ctx, self.disks, self.qemu_tls, run_as)  # level 2 copies served
        self.handlers = self._handlers()
        self._next_trim = 0.0
        self._next_write_through_check = 0.0
        self._stopping = False
        self._migrating: set[str] = set()  # VMs this host is sending away
        self._arriving: set[str] = set()   # VMs a live migration handed to this host, not yet started
        self._failback_at: dict[str, float] = {}  # monotonic time before which no failback is asked again
        self._tick_seconds: deque[float] = deque(maxlen=100)  # control-plane cost figures
        self._ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- start-up ----------------------------------------------------------------
    @property
    def lease(self) -> int:
        return self.host_lease.id

    @property
    def info(self) -> HostInfo:
        return HostInfo(name=self.cfg.name, memory_mib=self.cfg.memory_mib, vcpus=self.cfg.vcpus,
                        image_roots=self.cfg.image_roots,
                        shared_storage=self.cfg.shared_storage, lease_id=self.lease,
                        replication_addr=self.cfg.replication_addr)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.accel = await asyncio.to_thread(choose_accel, self.cfg.accel, self.cfg.probe_kernel)
        log.info("accelerator: %s (%s)", self.accel.accel, self.accel.reason)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        await self.host_lease.join()
        self.guard.start()
        await self._start_l3_partner()
        await self._start_api()
        self.event("", "agent", f"agent up (lease {self.lease:x}, ttl {self.host_lease.ttl}s, "
                                f"accel {self.accel.accel})")
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._request_stop)
        tasks = [asyncio.create_task(self.host_lease.keep_alive(), name="keepalive"),
                 asyncio.create_task(self._watch_loop(), name="watch")]
        try:
            await self._reconcile_loop()
        finally:
            for t in tasks:
                t.cancel()
            await self._shutdown()

    async def _start_api(self) -> None:
        if self.cfg.api_listen is None:
            return
        from ..api.server import ApiContext, make_app, serve
        addr, port = self.cfg.api_listen
        ctx = ApiContext(store=self.store, pool=self.cfg.pool, endpoints=list(self.cfg.etcd),
                         token=self.cfg.api_token, snapshot=self.store.snapshot, health=self._health,
                         counters=self.counters, read_token=self.cfg.api_read_token)
        assert self.cfg.api_tls is not None  # the config refuses api_listen without a certificate
        try:
            self._api = await serve(make_app(ctx), addr, port, self.cfg.api_tls.server_context())
        except OSError as e:
            self.event("", "error", f"cannot serve the API on {addr}:{port}: {e}")

    def _health(self) -> AgentHealth:
        ticks = list(self._tick_seconds)
        return AgentHealth(self.cfg.name, self.host_lease.quorum_ok, float(self.host_lease.ttl), self.guard.remaining(),
                           tick_seconds=sum(ticks) / len(ticks) if ticks else 0.0, ticks=self._ticks,
                           etcd_requests=self.etcd.requests)

    async def _start_l3_partner(self) -> None:
        if not (self.cfg.replication_addr and self.cfg.local_storage):
            return
        self.l3_partner = L3Partner(self.ctx, self.cfg.replication_addr, self.cfg.checkpoint_port,
                                    self._l3_link.key, self.disks.l3_files)
        try:
            await self.l3_partner.start()
        except OSError as e:
            self.l3_partner = None
            self.event("", "error", f"cannot listen for level 3 checkpoints on "
                                    f"{self.cfg.replication_addr}:{self.cfg.checkpoint_port}: {e}")

    @property
    def _l3_link(self) -> LinkConfig:
        return LinkConfig(self.cfg.checkpoint_port, derive(self.cfg.pool_secret, "checkpoint stream"),
                          self.cfg.replication_addr)

    def _request_stop(self) -> None:
        self._stopping = True
        self.wake.set()

    async def _shutdown(self) -> None:
        """Orderly stop: VMs stopped and released, lease revoked, so peers take over at once."""
        async def stop_and_release(rec: LocalRecord, qemu: QemuVm) -> None:
            # level 3: no shutdown, the partner carries on from the last checkpoint (a guest
            # caught half-way through shutting down would carry on shutting down there)
            await qemu.stop(0.0 if rec.l3 is not None else self.cfg.stop_grace, rec.stop_hurry)
            self.guard.unregister(rec.name)
            try:
                await self.store.release(rec.name, rec.token)
            except EtcdError:
                pass
        # all at once: each guest gets the whole grace, not a turn in a queue
        await asyncio.gather(*(stop_and_release(rec, rec.qemu) for rec in list(self.vms.values())
                               if rec.qemu and rec.qemu.alive))
        self.guard.close()
        if self.l3_partner is not None:
            await self.l3_partner.close()
        if self._api is not None:
            await self._api.cleanup()
        try:
            await self.journal.flush()
            await self.host_lease.revoke()
        except EtcdError:
            pass
        await self.etcd.close()

    def _on_fence(self, names: list[str], at: float) -> None:  # called from the guard thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._record_fence, names, at)

    def _record_fence(self, names: list[str], at: float) -> None:
        for name in names:
            self.counters.fences += 1
            rec = self.vms.get(name)
            if rec is not None:
                rec.detail = "self-fenced"
            self.event(name, "fence", "lease could not be renewed: VM killed (self-fence) "
                                      "before the lease expires", at=at)

    # --- watch: wake the loop on any change ----------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            try:
                _, rev = await self.etcd.get_prefix(self.store.state + "\0never")
                async for _batch in self.etcd.watch_prefix(self.store.state, rev + 1):
                    self.wake.set()
            except EtcdError:
                pass
            except Exception as e:  # noqa: BLE001 - the loop must go on; the error is logged
                self.journal.loop_error("watch", e)
            await asyncio.sleep(self.t.tick)

    # --- reconcile ---------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self.wake.wait(), self.t.tick)
            except TimeoutError:
                pass
            self.wake.clear()
            if self._stopping:
                break
            try:
                await self.tick()
            except EtcdError as e:
                log.debug("tick skipped: %s", e)
            except Exception as e:  # noqa: BLE001 - one bad tick must not stop every VM here
                self.journal.loop_error("reconcile", e)
                await asyncio.sleep(self.t.tick)

    def local_view(self) -> LocalView:
        return LocalView(self.cfg.name, {
            name: LocalVm(name, rec.state, rec.token, rec.exit_code) for name, rec in self.vms.items()},
            self.exports.names(), self.l3_partner.local_standbys() if self.l3_partner else {}, now=time.time())

    async def tick(self) -> TickReport:
        t0 = time.monotonic()
        try:
            return await self._tick()
        finally:
            self._ticks += 1
            self._tick_seconds.append(time.monotonic() - t0)

    async def _tick(self) -> TickReport:
        snapshot = (await self.store.snapshot()).holding_frozen(self.snapshot)
        self.snapshot = snapshot
        self.journal.bad_records(snapshot)
        self._forget_finished(snapshot)
        report = decide(snapshot, self.local_view(), self.t.partner_replace_after, self.t.l3_takeover_after)
        if report.actions():
            log.info("%s", report.summary())
        # kills (never two copies) and takeovers (a guest waits) before the rest
        for decision in sorted(report.actions(), key=lambda d: d.action not in URGENT):
            await self._execute(decision, snapshot)
        for name, rec in self.vms.items():  # `vm stop --force` while the guest shuts down
            view = snapshot.vms.get(name)
            if rec.state is RunState.STOPPING and (view is None or view.spec.stop_force):
                rec.stop_hurry.set()
        await self._report_status(snapshot)
        await self._report_links(snapshot)
        await self._check_write_through()
        await self.journal.flush()
        if time.monotonic() > self._next_trim:
            self._next_trim = time.monotonic() + EVENT_TRIM_INTERVAL
            trimmed = await self.store.trim_events()
            if trimmed:
                log.info("trimmed %d old events (keeping the newest %d)", trimmed, MAX_EVENTS)
            await self.store.trim_history(time.time() - HISTORY_DAYS * 86400)
        return report

    async def _check_write_through(self) -> None:
        """Every few seconds: the write-through copies (ours and those we serve) still are.
        In a thread: restoring the attribute syncs the file, which must not stall the loop."""
        if time.monotonic() < self._next_write_through_check:
            return
        self._next_write_through_check = time.monotonic() + WRITE_THROUGH_CHECK_INTERVAL
        held = [(name, rec.replica.images) for name, rec in self.vms.items() if rec.replica is not None]
        held += [(name, rec.kept_write_through) for name, rec in self.vms.items() if rec.kept_write_through]
        held += self.exports.images()
        for vm, images in held:
            for path in await asyncio.to_thread(restore_write_through, images):
                self.event(vm, "warning", f"{path} had lost its synchronous-write attribute: set again "
                                          "and synced (its nodes skip flushes; see qemu/writethrough.py)")

    async def _report_links(self, snapshot: PoolSnapshot) -> None:
        """Monitor this host's A-links (operstate) and publish them when they change."""
        if not self.cfg.a_links:
            return
        links = {peer: {i: _link_up(i) for i in ifs} for peer, ifs in self.cfg.a_links}
        if snapshot.links.get(self.cfg.name) != links:
            before = snapshot.links.get(self.cfg.name, {})
            await self.store.report_links(self.cfg.name, links, self.lease)
            for peer, ifs in links.items():
                for i, up in ifs.items():
                    if before and before.get(peer, {}).get(i) != up:
                        self.event("", "a-link", f"A-link {i} to {peer} is {'up' if up else 'DOWN'}")

    # --- the executor: one handler per decision ------------------------------------------
    def _handlers(self) -> dict[Action, Handler]:
        """What each of `decide`'s actions does here (every action but WAIT has one)."""
        return {Action.KILL: self._kill, Action.CLAIM: self._claim, Action.START: self._start_or_resume,
                Action.STOP: self._stop, Action.RELEASE: self._release, Action.EXPORT: self._export,
                Action.UNEXPORT: self._unexport, Action.PREPARE_INCOMING: self._prepare_incoming,
                Action.MIGRATE: self._begin_migrate_out, Action.CHANGE_LEVEL: self._begin_change_level,
                Action.REPLACE_PARTNER: self._replace_partner, Action.FAILBACK: self._failback,
                Action.TAKE_OVER: self._take_over}

    async def _execute(self, d: Decision, snapshot: PoolSnapshot) -> None:
        await self.handlers[d.action](d, snapshot)

    async def _kill(self, d: Decision, snapshot: PoolSnapshot) -> None:
        rec = self.vms[d.vm]
        if rec.qemu and rec.qemu.alive:
            rec.qemu.kill()
        rec.state, rec.detail = RunState.STOPPING, d.reason
        self.event(d.vm, "kill", d.reason)

    async def _claim(self, d: Decision, snapshot: PoolSnapshot) -> None:
        if not self.guard.may_run():
            return
        view = snapshot.vms[d.vm]
        copies_new = claim_plan(snapshot, view, self.cfg.name, time.time())
        token = await self.store.claim(d.vm, self.cfg.name, self.lease, view.copies, copies_new)
        if token is None:
            return
        if view.handover_host == self.cfg.name:
            self._arriving.add(d.vm)
        if view.home not in (None, self.cfg.name) and view.home not in snapshot.hosts:
            # the host was lost about a lease TTL before its lease expired (now)
            self.history(d.vm, "down", f"host {view.home} lost", at=time.time() - self.t.lease_ttl,
                         host=view.home)
        extra = ""
        if view.force_host == self.cfg.name:
            extra = "; OPERATOR FORCED THIS START, ACCEPTING DATA LOSS"
        if copies_new is not None:
            extra += f"; copies: {_copies_summary(copies_new)}"
        self.event(d.vm, "claim", f"{d.reason} (fencing token {token}){extra}")
        self.wake.set()

    async def _take_over(self, d: Decision, snapshot: PoolSnapshot) -> None:
        if self.l3_partner is not None and self.guard.may_run():
            await self.l3_partner.take_over(d.vm)

    async def _begin_change_level(self, d: Decision, snapshot: PoolSnapshot) -> None:
        if d.vm not in self._migrating:
            self._migrating.add(d.vm)
            asyncio.create_task(self._change_level(d, snapshot))

    async def _begin_migrate_out(self, d: Decision, snapshot: PoolSnapshot) -> None:
        if d.vm not in self._migrating:
            self._migrating.add(d.vm)
            asyncio.create_task(self._migrate_out(d, snapshot))

    async def _start_or_resume(self, d: Decision, snapshot: PoolSnapshot) -> None:
        assert d.token is not None
        prev = self.vms.get(d.vm)
        if prev is not None and prev.state is RunState.INCOMING:
            await self._resume_incoming(d, prev)
            return
        if prev is not None and time.monotonic() < prev.retry_at:
            return  # backing off after failed starts
        await self._start(d, snapshot, prev.failures if prev else 0)

    async def _stop(self, d: Decision, snapshot: PoolSnapshot) -> None:
        rec = self.vms[d.vm]
        rec.state = RunState.STOPPING
        stopping = snapshot.vms.get(d.vm)
        grace = 0.0 if stopping is None or stopping.spec.stop_force else self.cfg.stop_grace
        how = f"the guest is asked to power off, up to {grace:g} s" if grace > 0 else "powered off at once"
        self.event(d.vm, "stop", f"{d.reason}: {how}")
        self.history(d.vm, "stopped", d.reason)
        if rec.qemu:
            asyncio.create_task(self._stop_vm(rec, rec.qemu, grace))

    async def _export(self, d: Decision, snapshot: PoolSnapshot) -> None:
        await self.exports.serve(snapshot.vms[d.vm].spec, d.reason)

    async def _unexport(self, d: Decision, snapshot: PoolSnapshot) -> None:
        await self.exports.withdraw(d.vm, d.reason)

    async def _release(self, d: Decision, snapshot: PoolSnapshot) -> None:
        assert d.token is not None
        if await self.store.release(d.vm, d.token):
            self.vms.pop(d.vm, None)
            self.event(d.vm, "release", d.reason)

    # --- live migration (agent/migration.py) -----------------------------------------------
    async def _prepare_incoming(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Target: a paused QEMU listening for the VM, announced under this host's lease.
        Level 3: the standby holding a committed checkpoint is what is announced."""
        spec = snapshot.vms[d.vm].spec
        assert self.accel is not None
        if not self.cfg.replication_addr:
            self.event(d.vm, "error", "cannot receive a live migration: no replication_addr configured")
            return
        if spec.level is Level.SYSTEM:
            if self.l3_partner is None or not self.l3_partner.holds_checkpoint(d.vm):
                return  # not yet: the next tick looks again (the source refuses if it never comes)
            ready = Incoming(self.cfg.name, self.cfg.replication_addr, self.cfg.checkpoint_port)
            if await self.store.publish_incoming(d.vm, ready, self.lease):
                self.event(d.vm, "incoming", f"{d.reason}: the replica here is current, ready for the switchover")
            return
        paths = VmPaths(self.cfg.state_dir / "vms" / d.vm)
        disks: IncomingDisks | None = None
        try:
            if spec.level is Level.COMPONENT:
                disks = self.disks.incoming(spec, snapshot.vms[d.vm].copies)
            qemu = await self._launch(spec, paths, incoming=True, blockdevs=disks.blockdevs if disks else None)
        except (QemuError, StorageDaemonError, OSError) as e:
            self.event(d.vm, "error", f"cannot start the migration target: {e}")
            return
        rec = LocalRecord(d.vm, 0, RunState.INCOMING, qemu=qemu, detail="receiving a live migration",
                          incoming_disks=disks)
        self.vms[d.vm] = rec
        asyncio.create_task(self._watch_process(rec, qemu))
        try:
            incoming = await migration.listen_for(qemu, self.cfg.replication_addr, late_activation=disks is not None)
            published = await self.store.publish_incoming(
                d.vm, replace(incoming, host=self.cfg.name), self.lease)
        except Exception as e:
            published = False
            self.event(d.vm, "error", f"cannot listen for the migration: {e}")
        if not published:
            rec.state = RunState.STOPPING
            qemu.kill()
            return
        self.event(d.vm, "incoming", f"{d.reason}: QEMU pid {qemu.pid} listens on "
                                     f"{incoming.addr}:{incoming.port}")

    async def _migrate_out(self, d: Decision, snapshot: PoolSnapshot) -> None:
        view = snapshot.vms[d.vm]
        rec = self.vms.get(d.vm)
        try:
            if rec is None or rec.qemu is None or view.migration is None or view.incoming is None:
                return
            assert d.token is not None
            # (a VM lowered from level 3 keeps its relays: it migrates like any other of its level)
            if view.spec.level is Level.SYSTEM and rec.l3 is not None:
                moved = await migration.switch_over(self.ctx.for_vm(d.vm, d.token), rec.l3, view.migration)
                if moved:
                    await rec.l3.hand_off()
            else:
                moved = await migration.send(self.ctx.for_vm(d.vm, d.token), rec.qemu, view.migration,
                                             view.incoming, keep_copies=view.spec.level is Level.COMPONENT,
                                             stopped_copy=self._inexact_dirty_tracking)
            if moved:
                rec.state, rec.detail = RunState.STOPPING, f"migrated to {view.migration.to}"
                rec.qemu.kill()  # paused since the migration completed; the target runs the VM
        finally:
            self._migrating.discard(d.vm)
            self.wake.set()

    async def _failback(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Ask the live migration back to the preferred host (not again for a while if one
        was asked recently: a failing move must not repeat every tick)."""
        if d.token is None or d.target is None or time.monotonic() < self._failback_at.get(d.vm, 0.0):
            return
        self._failback_at[d.vm] = time.monotonic() + FAILBACK_RETRY_S
        m = Migration(to=d.target, source=self.cfg.name, token=d.token, started=time.time())
        if await self.store.request_migration(d.vm, d.token, m, self.lease):
            self.event(d.vm, "failback", f"{d.reason}: live migration back to {d.target} asked")
            self.wake.set()

    async def _replace_partner(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """The partner is gone for good: a new replica on `d.target` (built in full by the
        replica manager or, level 3, by a new pre-copy)."""
        copies = snapshot.vms[d.vm].copies
        if copies is None or d.token is None or d.target is None:
            return
        old = copies.partner_of(self.cfg.name)
        if old is None:
            return
        new = replace_partner(copies, old, d.target, time.time())
        if await self.store.set_copies(d.vm, d.token, copies, new) is not None:
            self.event(d.vm, "replace-partner", f"{d.reason}; {old}'s copy forgotten")
            self.wake.set()

    async def _change_level(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Raise or lower a running VM's level (agent/levels.py); a failure leaves it as it was."""
        view = snapshot.vms[d.vm]
        rec = self.vms.get(d.vm)
        change = view.level_change
        try:
            fresh = (await self.store.snapshot()).vms.get(d.vm)
            if fresh is None or fresh.level_change != change:
                return  # ended (e.g. a failed attempt deleted it) since this tick's snapshot
            if rec is None or rec.qemu is None or change is None or d.token is None:
                return
            qemu, token = rec.qemu, d.token
            owner = self.ctx.for_vm(d.vm, token)
            ctx = levels.LevelContext(
                self.ctx, d.vm, token, qemu, self.disks.image, self.disks.writable,
                lambda images, graphs: ReplicaManager(owner, qemu, images, graphs),
                shared_storage=self.cfg.shared_storage)
            spec = view.spec
            step = transition(spec.level, Level(change.level))
            if step is Transition.RAISE_TO_COMPONENT:
                rec.replica = await levels.raise_to_component(ctx, spec, change)
            elif step is Transition.LOWER_FROM_COMPONENT and rec.replica is not None:
                await levels.lower_from_component(ctx, spec, change, rec.replica)
                if change.level == Level.UNPROTECTED:
                    rec.kept_write_through = [img for img in rec.replica.images if img.write_through]
                rec.replica = None
            elif step is Transition.RAISE_TO_SYSTEM:
                await self._raise_to_system(d, ctx, spec, change, rec)
            elif step is Transition.LOWER_FROM_SYSTEM and rec.l3 is not None:
                try:
                    await rec.l3.end_protection(f"level 3 -> {change.level} asked")
                except RuntimeError as e:
                    raise OwnershipLost(str(e)) from None
                current = [levels.RunningDisk(str(p), "raw", f"disk{i}-file")
                           for i, p in enumerate(self.disks.l3_files(spec).disks)]
                rec.replica = await levels.lower_from_system(ctx, spec, change, current)
            else:
                raise RuntimeError(f"level {int(spec.level)} -> {change.level} cannot be made while running")
        except OwnershipLost as e:
            self.event(d.vm, "kill", f"level change: {e}; killing this copy")
            if rec is not None and rec.qemu is not None:
                rec.qemu.kill()
        except Exception as e:
            log.exception("%s: level change failed", d.vm)
            self.event(d.vm, "level", f"level {int(view.spec.level)} -> {change.level if change else '?'} "
                                      f"failed: {e}; the VM runs on at level {int(view.spec.level)}")
            with suppress(EtcdError):
                await self.store.end_level_change(d.vm)
        finally:
            self._migrating.discard(d.vm)
            self.wake.set()

    async def _raise_to_system(self, d: Decision, ctx: levels.LevelContext, spec: VmSpec, change: LevelChange,
                               rec: LocalRecord) -> None:
        """Level 0/1/2 -> 3 while running: the VM moves live into a new QEMU on this host
        (agent/levels.py, `raise_to_system`); this is the switch from the old QEMU to it."""
        assert d.token is not None and rec.qemu is not None and self.accel is not None
        token, accel = d.token, self.accel
        replica = rec.replica
        if spec.level is Level.COMPONENT and replica is not None:
            current = await levels.end_replication(replica, "level 3 asked: the replica is rebuilt by checkpoints")
        else:
            current = levels.running_disks(spec)
        files = self.disks.l3_files(spec)
        run_dir = self.cfg.state_dir / "vms" / d.vm / "l3"
        paths = VmPaths(run_dir)

        target = levels.SystemTarget(
            files=files, run_dir=run_dir, bridge=self.cfg.bridge, stopped_copy=self._inexact_dirty_tracking,
            start_qemu=lambda new_spec, blockdevs: self._launch(
                new_spec, paths, blockdevs=blockdevs, checkpointed=Checkpointed(str(files.ram)), incoming=True),
            make_l3=lambda new_spec: L3Primary(self.ctx.for_vm(d.vm, token), new_spec, paths, files,
                                               self._l3_link, self._checkpoint_counter(d.vm)))
        try:
            new_qemu, l3 = await levels.raise_to_system(ctx, spec, change, current, target)
        except Exception:
            if replica is not None:
                replica.restart()  # still level 2: the partner's copy is resynced in full
            raise
        old, old_l3 = rec.qemu, rec.l3
        rec.qemu, rec.replica = new_qemu, None  # the old QEMU's watcher sees it was replaced
        rec.kept_write_through = []
        old.taps = []  # its taps become the relays' (its watcher must not remove them when it ends)
        old.kill()
        with suppress(TimeoutError):
            await asyncio.wait_for(old.proc.wait(), 5.0)  # its tap is free once it is gone
        if old_l3 is not None:  # lowered from level 3 earlier: its relays held the taps
            await old_l3.close()
        if not self.guard.may_run():
            new_qemu.kill()
            raise OwnershipLost("the host lease ran out during the switch")
        self.guard.register(d.vm, new_qemu.pidfd)
        asyncio.create_task(self._watch_process(rec, new_qemu))
        l3.attach_taps(self.cfg.bridge)
        await new_qemu.execute("cont")
        rec.l3 = l3
        l3.begin(new_qemu)
        with suppress(Exception):
            await new_qemu.announce()
        rec.detail = f"pid {new_qemu.pid}, {accel.accel}"
        for sock in ("qmp.sock", "qmp-debug.sock"):  # where tools look for this VM's QEMU
            if (run_dir / sock).exists():
                os.replace(run_dir / sock, run_dir.parent / sock)

    async def _resume_incoming(self, d: Decision, rec: LocalRecord) -> None:
        """Target, after the handover and our claim: run the received VM."""
        assert d.token is not None and rec.qemu is not None
        qemu = rec.qemu
        starting = VmStatus(self.cfg.name, RunState.STARTING, d.token, time.time(), d.reason)
        if not self.guard.may_run() or not await self.store.report_status(d.vm, starting, self.lease):
            return
        disks = rec.incoming_disks
        try:
            await migration.wait_received(qemu)
            if disks is None:
                await qemu.execute("cont")
            else:  # level 2: on this host's copy, tracking every write for the old host's resync
                await self.exports.withdraw(d.vm)
                rec.replica = ReplicaManager(self.ctx.for_vm(d.vm, d.token), qemu, disks.images, disks.graphs)
                await rec.replica.begin()
        except Exception as e:
            rec.state, rec.detail = RunState.CRASHED, f"resuming the migrated VM failed: {e}"
            if rec.replica is not None:
                rec.replica.stop()
            qemu.kill()
            self.event(d.vm, "error", rec.detail)
            return
        self.guard.register(d.vm, qemu.pidfd)
        with suppress(Exception):
            await qemu.announce()
        rec.token, rec.state, rec.since = d.token, RunState.RUNNING, time.time()
        rec.detail = f"pid {qemu.pid}, {self.accel.accel if self.accel else ''}"
        self.counters.migrations[d.vm] = self.counters.migrations.get(d.vm, 0) + 1
        self.history(d.vm, "up", "live migration")
        self.event(d.vm, "start", f"{d.reason}: QEMU pid {qemu.pid} runs the migrated VM (token {d.token})")

    @property
    def _inexact_dirty_tracking(self) -> bool:
        """QEMU's own dirty tracking misses writes here (TCG): migration.STOPPED_COPY_WHY."""
        return self.accel is None or self.accel.accel != "kvm"

    async def _launch(self, spec: VmSpec, paths: VmPaths, **how: Any) -> QemuVm:
        """Start a QEMU for `spec` the way this host runs them (accelerator, bridge, TLS keys,
        QEMU's user, the lab's debug socket), its events reported as the VM's; `how`: the
        rest of `QemuVm.start`'s arguments (disks as block nodes, paused, incoming, ...)."""
        assert self.accel is not None
        vm = spec.name
        return await QemuVm.start(spec, paths, self.accel, self.cfg.bridge,
                                  on_event=lambda name, data: self._on_qemu_event(vm, name, data),
                                  debug_qmp=self.cfg.debug_qmp, tls=self.qemu_tls, run_as=self.run_as, **how)

    async def _stop_vm(self, rec: LocalRecord, qemu: QemuVm, grace: float) -> None:
        try:
            if rec.l3 is not None:  # the partner must not take over a VM being stopped
                try:
                    await asyncio.wait_for(
                        rec.l3.retire(f"VM stopped on {self.cfg.name}: its own copy is the latest"), 5.0)
                except (EtcdError, TimeoutError) as e:
                    log.warning("%s: ending level 3 protection before the stop: %s", rec.name, e)
        finally:
            t0 = time.monotonic()
            await qemu.stop(grace, rec.stop_hurry)
            took = time.monotonic() - t0
            if grace > 0:
                outcome = {"guest": f"the guest powered off after {took:.1f} s",
                           "grace expired": f"the guest did not power off within {grace:g} s: powered off",
                           "hurried": f"powered off after {took:.1f} s (forced)"}.get(
                               qemu.stop_outcome, f"QEMU ended ({qemu.stop_outcome})")
                self.event(rec.name, "stop", outcome)

    async def _start(self, d: Decision, snapshot: PoolSnapshot, failures: int) -> None:
        view = snapshot.vms[d.vm]
        spec = view.spec
        token = d.token
        assert token is not None and self.accel is not None
        # Fencing: the start is recorded only if we still own the VM under this token.
        starting = VmStatus(self.cfg.name, RunState.STARTING, token, time.time(), d.reason)
        if not self.guard.may_run() or not await self.store.report_status(d.vm, starting, self.lease):
            log.warning("%s: not starting, ownership token %s no longer valid", d.vm, token)
            return
        rec = LocalRecord(d.vm, token, RunState.STARTING, reported=starting, failures=failures)
        self.vms[d.vm] = rec
        paths = VmPaths(self.cfg.state_dir / "vms" / d.vm)
        graphs: list[DiskGraph] = []
        blockdevs = None
        images: list[LocalImage] = []
        l3: L3Primary | None = None
        checkpointed: Checkpointed | None = None
        resume = False
        try:
            spec = resolved_spec(spec, self.cfg.shared_storage, self.cfg.image_roots + (
                (str(self.cfg.local_storage),) if self.cfg.local_storage else ()))  # level 0: lowered from 2
            if spec.level is Level.SYSTEM:
                l3, checkpointed, blockdevs = await self._prepare_l3(spec, view.copies, token, paths)
                rec.l3, resume = l3, checkpointed.incoming
            elif spec.level is Level.COMPONENT:
                await self.exports.withdraw(d.vm)  # promoted partner: release the image first
                images = self.disks.prepare(spec, view.copies)
                blockdevs = []
                for i, image in enumerate(images):
                    g, nodes = local_only_start(i, image)
                    graphs.append(g)
                    blockdevs.append(nodes)
            qemu = await self._launch(spec, paths, blockdevs=blockdevs, paused=blockdevs is not None,
                                      checkpointed=checkpointed)
            if l3 is not None:
                if resume:
                    try:
                        await l3.resume_from_replica(qemu)
                    except Exception:
                        qemu.kill()
                        await qemu.wait()
                        raise
                else:
                    await qemu.execute("cont")
        except (QemuError, StorageDaemonError, OSError, RuntimeError) as e:
            if l3 is not None:
                await l3.close()
                rec.l3 = None
            rec.state, rec.detail, rec.exit_code = RunState.CRASHED, str(e), None
            retry = backoff(rec.failures, time.monotonic())
            rec.failures, rec.retry_at = retry.failures, retry.at
            self.event(d.vm, "error", f"start failed: {e}; next try in "
                                      f"{rec.retry_at - time.monotonic():.1f}s")
            return
        rec.qemu = qemu
        self.guard.register(d.vm, qemu.pidfd)
        asyncio.create_task(self._watch_process(rec, qemu))
        if spec.level is Level.COMPONENT:  # (level 3 disks are blockdevs too, but checkpointed, not mirrored)
            rec.replica = ReplicaManager(self.ctx.for_vm(d.vm, token), qemu, images, graphs)
            await rec.replica.begin()
        if l3 is not None:
            l3.begin(qemu)
        try:
            await qemu.announce()
        except Exception as e:  # the guest still runs; the LAN learns from its traffic
            log.warning("%s: announce-self failed: %s", d.vm, e)
        rec.state, rec.detail, rec.since = RunState.RUNNING, f"pid {qemu.pid}, {self.accel.accel}", time.time()
        arrived = d.vm in self._arriving
        self._arriving.discard(d.vm)
        how = " resumed from the replica's last checkpoint (guest carries on)" if resume else " started"
        if arrived:
            how = " resumed from the final checkpoint of the switchover (live migration)"
            self.counters.migrations[d.vm] = self.counters.migrations.get(d.vm, 0) + 1
            self.history(d.vm, "up", "live migration")
        else:
            self.history(d.vm, "up", "resumed from the last checkpoint" if resume else d.reason)
            if resume or d.failover:
                self.counters.failovers[d.vm] = self.counters.failovers.get(d.vm, 0) + 1
        self.event(d.vm, "start", f"{d.reason}: QEMU pid {qemu.pid}{how} (token {token})")

    async def _prepare_l3(self, spec: VmSpec, copies: Copies | None, token: int,
                          paths: VmPaths) -> tuple[L3Primary, Checkpointed, list[list[dict[str, Any]]]]:
        """Level 3: this host's files, and whether to resume from a committed checkpoint.
        The checkpoint record is consumed by the start that uses it (a later restart on
        this host boots from the disk, which has moved on since)."""
        if self.cfg.local_storage is None:
            raise StorageDaemonError("this host has no local_storage configured for level 3 copies")
        files = self.disks.l3_files(spec)
        if self.l3_partner is not None:
            self.l3_partner.drop(spec.name)
        copies = await self._outdate_other_copies(spec.name, token, copies)
        committed = read_committed(files)
        files.meta.unlink(missing_ok=True)
        mine = copies.state_of(self.cfg.name) if copies else None
        brand_new = mine is not None and mine.state is CopyState.CURRENT and mine.reason == NEW_DISK
        resume = committed is not None and not brand_new and files.device_state.exists() and files.ram.exists()
        for i, disk in enumerate(spec.disks):
            image = LocalImage(str(files.disks[i]), "raw")
            if not os.path.exists(image.path):
                if not brand_new:
                    raise StorageDaemonError(f"this host's copy {image.path} is missing")
                ensure_image(image, disk.size)
        if not resume:
            files.ram.unlink(missing_ok=True)  # a cold boot starts from fresh RAM
        make_guest_ram_dir(files.ram)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        l3 = L3Primary(self.ctx.for_vm(spec.name, token), spec, paths, files, self._l3_link,
                       self._checkpoint_counter(spec.name))
        await l3.open_relays(self.cfg.bridge)
        blockdevs = [checkpointed_disk_nodes(i, str(p)) for i, p in enumerate(files.disks)]
        return l3, Checkpointed(str(files.ram), incoming=resume), blockdevs

    def _checkpoint_counter(self, vm: str) -> Callable[[int], None]:
        """Adds a level 3 VM's new checkpoints to this agent's metrics counter."""
        def count(n: int) -> None:
            self.counters.checkpoints[vm] = self.counters.checkpoints.get(vm, 0) + n
        return count

    async def _outdate_other_copies(self, vm: str, token: int, copies: Copies | None) -> Copies | None:
        """Level 3: before this host's QEMU can send anything, no other copy may still be
        recorded current (a partner would otherwise take over from a checkpoint older than
        what this start will make visible). Fails if the partner took over meanwhile."""
        if copies is None:
            return None

        def outdate_others(seen: Copies) -> Copies | None:
            others = [h for h, c in seen.copies.items() if h != self.cfg.name and c.state is CopyState.CURRENT]
            new = seen
            for h in others:
                new = mark(new, h, CopyState.OUTDATED, f"VM (re)started on {self.cfg.name}", time.time(), full=True)
            return new if others else None
        try:
            return await self.store.update_copies(vm, token, outdate_others)
        except OwnershipLost as e:
            raise StorageDaemonError(f"ownership lost before the start (the partner took over?): {e}") from None

    def _drop_stale_guest_ram(self, snapshot: PoolSnapshot) -> None:
        """Level 3 RAM files (tmpfs: real memory) of VMs removed or stopped and not run here."""
        root = self.cfg.guest_ram_dir
        if not root.is_dir():
            return
        for d in root.iterdir():
            if d.name in snapshot.frozen:
                continue  # its records say nothing certain: keep the replica
            if not (d / RAM_DIR_MARKER).is_file():
                continue  # not made by ftvm (or by an older one): never delete it
            view = snapshot.vms.get(d.name)
            rec = self.vms.get(d.name)
            if rec is not None and rec.state in ACTIVE_STATES:
                continue
            if view is None or (view.spec.desired is Desired.STOPPED and view.owner is None) or (
                    view.spec.level is not Level.SYSTEM and rec is None):  # lowered from 3 while running
                if self.l3_partner is not None:
                    self.l3_partner.drop(d.name)
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed the level 3 RAM file of %s (%s)", d.name,
                         "VM removed" if view is None else "VM stopped")

    def _forget_finished(self, snapshot: PoolSnapshot) -> None:
        """Drop records of VMs no longer running here and owned elsewhere (or by nobody)."""
        self._drop_stale_guest_ram(snapshot)
        for name, rec in list(self.vms.items()):
            view = snapshot.vms.get(name)
            owned_here = view is not None and view.owner is not None and view.owner.host == self.cfg.name
            waiting = rec.state is RunState.INCOMING and rec.qemu is not None and rec.qemu.alive
            if rec.state not in ACTIVE_STATES and not owned_here and not waiting:
                del self.vms[name]
        self.exports.forget_dead()

    # QMP events worth an entry in the event log; exits are seen by _watch_process.
    NOTABLE_QEMU_EVENTS = frozenset({"SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED",
                                     "BLOCK_IO_ERROR", "WATCHDOG"})

    def _on_qemu_event(self, vm: str, name: str, data: dict[str, Any]) -> None:
        rec = self.vms.get(vm)
        if rec is not None and rec.replica is not None:
            rec.replica.on_qemu_event(name, data)
        if rec is not None and rec.l3 is not None and name in ("STOP", "RESUME"):
            return  # level 3 stops the guest at every checkpoint: not news
        if name in self.NOTABLE_QEMU_EVENTS:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(data.items()) if not isinstance(v, dict))
            self.event(vm, "qemu", f"QEMU event {name}" + (f" ({detail})" if detail else ""))
            self.wake.set()

    async def _watch_process(self, rec: LocalRecord, qemu: QemuVm) -> None:
        code = await qemu.proc.wait()
        if rec.qemu is not None and rec.qemu is not qemu:  # replaced by a new QEMU (raised to level 3)
            await qemu.wait()
            return
        self.guard.unregister(rec.name)  # before the pidfd is closed
        rec.kept_write_through = []
        if rec.replica is not None:
            rec.replica.stop()
        if rec.l3 is not None:
            try:
                await asyncio.wait_for(rec.l3.close(), 5.0)
            except (TimeoutError, Exception) as e:  # the VM's exit must be recorded whatever happens
                log.warning("%s: closing the level 3 runtime: %s", rec.name, e or type(e).__name__)
        await qemu.wait()
        if self.vms.get(rec.name) is not rec:
            return
        rec.exit_code = code
        if qemu.stop_requested or rec.state is RunState.STOPPING or (rec.l3 is not None and rec.l3.superseded):
            rec.state = RunState.STOPPED
            self.event(rec.name, "stopped", f"QEMU exited (code {code})")
        else:
            rec.state = RunState.CRASHED
            why = rec.detail if rec.detail == "self-fenced" else f"QEMU exited unasked (code {code})"
            if rec.token:  # a VM this host ran (not a migration target that never ran it)
                self.history(rec.name, "down", why)
            rec.detail = why
            partner = self.t.l3_takeover_after if rec.l3 is not None and rec.l3.partner_current() else None
            retry = after_exit(rec.failures, time.time() - qemu.started_at, time.monotonic(), partner)
            rec.failures, rec.retry_at = retry.failures, retry.at
            self.event(rec.name, "exit", why)
        self.wake.set()

    async def _report_status(self, snapshot: PoolSnapshot) -> None:
        for name, rec in self.vms.items():
            view = snapshot.vms.get(name)
            if view is None or view.owner is None or view.owner.host != self.cfg.name:
                continue
            detail = rec.detail
            if rec.replica is not None and rec.replica.problem:
                detail = f"PAUSED: {rec.replica.problem}"
            status = VmStatus(self.cfg.name, rec.state, rec.token, rec.since, detail)
            if view.status == status:
                continue
            if await self.store.report_status(name, status, self.lease):
                rec.reported = status


def _copies_summary(copies: Copies) -> str:
    return ", ".join(f"{h} {c.state.value}" + (" (full resync)" if c.full else "")
                     for h, c in sorted(copies.copies.items())) + f" (gen {copies.gen})"


def _link_up(interface: str) -> bool:
    try:
        with open(f"/sys/class/net/{interface}/operstate") as f:
            return f.read().strip() == "up"
    except OSError:
        return False
