"""The host agent: the reconcile loop and its executor.

One agent per host. Each tick it reads the pool snapshot, asks the decision
core what to do (`core.decide`), hands each decision to its handler (the table
in `_handlers`), and reports what its VMs are doing. Besides the tick, store
changes (watch) and QEMU exits wake the loop early. The work lives in rooms:
lease.py, processes.py (QEMU), starts.py, disks.py, exports.py, replica.py
(level 2), l3.py (level 3), migration.py, level_changes.py + levels.py, journal.py.

Safety lives in three places:
  * the host lease, renewed every `keepalive_interval`; the fence guard
    thread kills every VM `self_fence_margin` before it could expire;
  * the fencing token: START and status writes are transactions that
    succeed only while this host still owns the VM with that token;
  * the decision core kills any VM running here without valid ownership.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from dataclasses import replace
from typing import Any

from ..api.metrics import AgentCounters, AgentHealth
from ..core.decide import ACTIVE_STATES, Action, Decision, TickReport, decide
from ..core.model import Desired, HostInfo, Level, LocalView, LocalVm, PoolSnapshot, RunState, VmSpec, VmStatus
from ..core.placement import claim_plan
from ..core.replication import Copies, replace_partner
from ..l3.channel import LinkConfig
from ..l3.standby import RAM_DIR_MARKER, ReplicaPaths
from ..l3.writes import Support, probe
from ..qemu.cmdline import VmPaths
from ..qemu.probe import Accel, choose_accel
from ..qemu.process import QemuVm
from ..qemu.runas import RunAs
from ..qemu.storage_daemon import restore_write_through
from ..qemu.tls import QemuTls
from ..secret import derive
from ..store.etcd import EtcdClient, EtcdError
from ..store.pool import HISTORY_DAYS, MAX_EVENTS, PoolStore
from .config import AgentConfig
from .adoption import Adoption
from .context import HostContext
from .disks import HostDisks
from .exports import Exports
from .guest import GuestFailures
from .dr import DrShipping
from .write_trace import WriteTraces
from .health import HealthProbes
from .fence import FenceGuard
from .journal import Journal
from .l3 import L3Partner, L3Primary
from .warm import WarmStandbys
from .lease import AgentStartError, HostLease
from .level_changes import LevelChanges
from .local import LocalRecord, spawn
from .migration import Migrations
from .processes import Processes
from .starts import Starts

log = logging.getLogger("ftvm.agent")


EVENT_TRIM_INTERVAL = 300.0  # seconds between trims of the event log to its newest MAX_EVENTS
WRITE_THROUGH_CHECK_INTERVAL = 5.0  # seconds between checks that write-through copies still are
TRASH = ".removed-"  # a guest RAM directory set aside to be freed


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
        self.guard = FenceGuard(self.t.fence_check, self._on_fence, config.state_dir / "fence-deadline")
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
        self.procs = Processes(config, self.journal, self.guard, self.wake.set, self.qemu_tls, run_as)
        self.vms = self.procs.vms
        self.dr = DrShipping(config, self.ctx, self.vms, run_as,  # asynchronous DR, both ends
                             lambda vm: self.l3_partner.standbys.get(vm) if self.l3_partner else None)
        self.traces = WriteTraces(config.state_dir, self.vms)  # write rates for the DR modeler
        self.migrations = Migrations(self.ctx, config, self.procs, self.disks, self.exports, self.counters,
                                     lambda: self.l3_partner)
        self.level_changes = LevelChanges(self.ctx, config, self.procs, self.disks, self._new_l3)
        self.starts = Starts(self.ctx, config, self.procs, self.disks, self.exports, self.migrations, self.counters,
                             lambda: self.l3_partner, self._new_l3)
        self.guest = GuestFailures(self.ctx, self.procs, self.counters)  # a guest's own failures
        self.health = HealthProbes(self.vms, self.journal, self.wake.set)  # probes of the guests' services
        self.adoption = Adoption(self.ctx, self.procs, config.state_dir / "vms")  # VMs kept through a restart
        self.handlers = self._handlers()
        self._next_trim = 0.0
        self._next_write_through_check = 0.0
        self._stopping = False
        self._detaching = False
        self._moving: set[str] = set()  # VMs with a live migration or level change under way here
        self._freeing: set[str] = set()  # guest RAM directories being removed (in threads)
        self._tick_seconds: deque[float] = deque(maxlen=100)  # control-plane cost figures
        self._ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- start-up ----------------------------------------------------------------
    @property
    def lease(self) -> int:
        return self.host_lease.id

    @property
    def accel(self) -> Accel | None:
        return self.procs.accel

    @property
    def info(self) -> HostInfo:
        return HostInfo(name=self.cfg.name, memory_mib=self.cfg.memory_mib, vcpus=self.cfg.vcpus,
                        image_roots=self.cfg.image_roots,
                        shared_storage=self.cfg.shared_storage, lease_id=self.lease,
                        replication_addr=self.cfg.replication_addr, api_url=self._api_url, site=self.cfg.site)

    @property
    def _api_url(self) -> str:
        if self.cfg.api_listen is None:
            return ""
        addr, port = self.cfg.api_listen
        return f"https://[{addr}]:{port}" if ":" in addr else f"https://{addr}:{port}"

    def _console_paths(self, name: str) -> VmPaths | None:
        """The files of the QEMU that runs `name` here now (its console and serial log)."""
        rec = self.vms.get(name)
        if rec is None or rec.qemu is None or rec.state not in (RunState.RUNNING, RunState.STOPPING):
            return None
        return rec.qemu.paths

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        # the lease first: VMs a previous agent left running are fenced by its deadline,
        # which only this agent's renewals move on (agent/lease.py, agent/adoption.py)
        await self.host_lease.join()
        self.guard.start()
        keepalive = asyncio.create_task(self.host_lease.keep_alive(), name="keepalive")
        accel = self.procs.accel = await asyncio.to_thread(choose_accel, self.cfg.accel, self.cfg.probe_kernel)
        log.info("accelerator: %s (%s)", accel.accel, accel.reason)
        tracking = self.procs.tracking = await asyncio.to_thread(self._probe_tracking)
        log.info("level 3 RAM: %s", tracking.why)
        log.info("%s", await self.exports.prepare())
        await self.dr.start()
        await self._adopt_kept_vms()
        await self._start_l3_partner()
        await self._start_api()
        self.event("", "agent", f"agent up (lease {self.lease:x}{' kept' if self.host_lease.resumed else ''}, "
                                f"ttl {self.host_lease.ttl}s, accel {accel.accel}; level 3 RAM: {tracking.why})")
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._request_stop)
        self._loop.add_signal_handler(signal.SIGUSR2, self._request_detach)
        tasks = [keepalive,
                 asyncio.create_task(self._watch_loop(), name="watch"),
                 asyncio.create_task(self.traces.run(), name="write-traces")]
        try:
            await self._reconcile_loop()
        finally:
            for t in tasks:
                t.cancel()
            await (self._detach() if self._detaching else self._shutdown())

    def _hold_state_dir(self) -> None:
        """One agent per state directory: a second one would manage the same VMs. The lock
        goes with this process, however it ends (the keepers do not inherit it)."""
        self._state_lock = open(self.cfg.state_dir / "agent.lock", "a")
        try:
            fcntl.flock(self._state_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AgentStartError(f"another agent runs with state directory {self.cfg.state_dir}") from None

    async def _adopt_kept_vms(self) -> None:
        """The VMs the previous agent left running (agent/adoption.py), seen against the pool."""
        while True:
            try:
                self.snapshot = await self.store.snapshot()
                break
            except EtcdError as e:
                log.warning("cannot read the pool to adopt running VMs yet: %s", e)
                await asyncio.sleep(self.t.tick)
        await self.adoption.adopt_all(self.snapshot, self.host_lease.resumed)

    async def _start_api(self) -> None:
        if self.cfg.api_listen is None:
            return
        from ..api.console import ConsoleContext
        from ..api.server import ApiContext, make_app, serve
        addr, port = self.cfg.api_listen
        assert self.cfg.api_tls is not None  # the config refuses api_listen without a certificate
        consoles = ConsoleContext(self.cfg.name, self._console_paths, self.cfg.api_tls.client_context(),
                                  local_trace=self.traces.path)
        ctx = ApiContext(store=self.store, pool=self.cfg.pool, endpoints=list(self.cfg.etcd),
                         token=self.cfg.api_token, snapshot=self.store.snapshot, health=self._health,
                         counters=self.counters, read_token=self.cfg.api_read_token, console=consoles)
        try:
            self._api = await serve(make_app(ctx), addr, port, self.cfg.api_tls.server_context())
        except OSError as e:
            self.event("", "error", f"cannot serve the API on {addr}:{port}: {e}")

    def _probe_tracking(self) -> Support:
        """How this host learns which guest RAM pages a level 3 checkpoint must send."""
        if not (self.cfg.replication_addr and self.cfg.local_storage):
            return Support(None, "page compare: this host runs no level 3 VM (no replication_addr/local_storage)")
        if self.cfg.l3_tracking == "compare":
            return Support(None, "page compare: l3_tracking = \"compare\" in host.toml")
        return probe(self.run_as)

    def _health(self) -> AgentHealth:
        ticks = list(self._tick_seconds)
        return AgentHealth(self.cfg.name, self.host_lease.quorum_ok, float(self.host_lease.ttl), self.guard.remaining(),
                           tick_seconds=sum(ticks) / len(ticks) if ticks else 0.0, ticks=self._ticks,
                           etcd_requests=self.etcd.requests)

    async def _start_l3_partner(self) -> None:
        if not (self.cfg.replication_addr and self.cfg.local_storage):
            return
        self.l3_partner = L3Partner(self.ctx, self.cfg.replication_addr, self.cfg.checkpoint_port,
                                    self._l3_link.key, self.disks.l3_files,
                                    WarmStandbys(self.starts.launch_warm if self.cfg.l3_warm_standby else None))
        try:
            await self.l3_partner.start()
        except OSError as e:
            self.l3_partner = None
            self.event("", "error", f"cannot listen for level 3 checkpoints on "
                                    f"{self.cfg.replication_addr}:{self.cfg.checkpoint_port}: {e}")

    @property
    def _l3_link(self) -> LinkConfig:
        return LinkConfig(self.cfg.checkpoint_port, derive(self.cfg.pool_secret, "checkpoint stream"),
                          self.cfg.replication_addr, compress_when=self.cfg.l3_compress)

    def _request_stop(self) -> None:
        self._stopping = True
        self.wake.set()

    def _request_detach(self) -> None:
        """SIGUSR2: end this agent and leave the VMs running (an upgrade: the next agent adopts them)."""
        self._detaching = True
        self._request_stop()

    async def _detach(self) -> None:
        """Leave without stopping anything: the keepers hold the VMs to the lease's deadline,
        which the next agent moves on if it starts in time (agent/adoption.py)."""
        self.adoption.record()
        self.event("", "agent", f"agent leaving, its {sum(1 for r in self.vms.values() if r.qemu)} VMs left "
                                f"running for the next agent (lease {self.lease:x} kept)")
        self.health.close()
        await self.dr.close()
        await self._leave(revoke=False)

    async def _leave(self, revoke: bool) -> None:
        """How both exits end: the guard, the level 3 partner and the API closed, events
        flushed, and the lease revoked (an orderly stop) or kept for the next agent."""
        self.guard.close()
        if self.l3_partner is not None:
            await self.l3_partner.close()
        if self._api is not None:
            await self._api.cleanup()
        try:
            await self.journal.flush()
            if revoke:
                await self.host_lease.revoke()
        except EtcdError:
            pass
        if not revoke:  # (last of all: the next agent's time to take the lease over runs from here)
            await self.host_lease.renew_for_successor()
        await self.etcd.close()

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
        self.health.close()
        await self.dr.close()
        # all at once: each guest gets the whole grace, not a turn in a queue
        await asyncio.gather(*(stop_and_release(rec, rec.qemu) for rec in list(self.vms.values())
                               if rec.qemu and rec.qemu.alive))
        await self._leave(revoke=True)

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
            name: LocalVm(name, rec.state, rec.token, rec.exit_code, rec.guest_failure,
                          rec.replica.yielded if rec.replica is not None else None)
            for name, rec in self.vms.items()},
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
        report = decide(snapshot, self.local_view(), self.t.partner_replace_after, self.t.l3_takeover_after,
                        self.t.dr_confirm)
        if report.actions():
            log.info("%s", report.summary())
        # kills (never two copies) and takeovers (a guest waits) before the rest
        for decision in sorted(report.actions(), key=lambda d: d.action not in URGENT):
            await self._execute(decision, snapshot)
        for name, rec in self.vms.items():  # `vm stop --force` while the guest shuts down
            view = snapshot.vms.get(name)
            if rec.state is RunState.STOPPING and (view is None or view.spec.stop_force):
                rec.stop_hurry.set()
        self.health.sync(snapshot, self._moving)
        self.adoption.record()
        self.dr.sync(snapshot)
        await self._report_status(snapshot)
        await self._report_links(snapshot)
        await self.exports.republish(snapshot)
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
                Action.UNEXPORT: self._unexport, Action.PREPARE_INCOMING: self.migrations.prepare_incoming,
                Action.MIGRATE: self._migrate_out, Action.CHANGE_LEVEL: self._change_level,
                Action.REPLACE_PARTNER: self._replace_partner, Action.FAILBACK: self.migrations.ask_failback,
                Action.TAKE_OVER: self._take_over, Action.GUEST_FAILED: self.guest.handle,
                Action.DR_CONFIRM: self.dr.confirm}

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
            self.migrations.expect(d.vm)
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

    async def _change_level(self, d: Decision, snapshot: PoolSnapshot) -> None:
        self._move_alone(d.vm, self.level_changes.change(d, snapshot))

    async def _migrate_out(self, d: Decision, snapshot: PoolSnapshot) -> None:
        self._move_alone(d.vm, self.migrations.migrate_out(d, snapshot))

    def _move_alone(self, vm: str, move: Coroutine[Any, Any, None]) -> None:
        """A migration or level change, in the background: one at a time per VM (the
        decision repeats every tick until the move ends)."""
        if vm in self._moving:
            move.close()
            return
        self._moving.add(vm)

        async def run() -> None:
            try:
                async with self.dr.quiet(vm):  # (the DR point in flight ends first: agent/dr.py)
                    await move
            finally:
                self._moving.discard(vm)
                self.wake.set()
        spawn(run(), name=f"move-{vm}")

    async def _start_or_resume(self, d: Decision, snapshot: PoolSnapshot) -> None:
        assert d.token is not None
        prev = self.vms.get(d.vm)
        if prev is not None and prev.state is RunState.INCOMING:
            await self.migrations.resume_incoming(d, prev)
            return
        if prev is not None and time.monotonic() < prev.retry_at:
            return  # backing off after failed starts
        await self.starts.start(d, snapshot, prev.failures if prev else 0)

    async def _stop(self, d: Decision, snapshot: PoolSnapshot) -> None:
        rec = self.vms[d.vm]
        rec.state = RunState.STOPPING
        stopping = snapshot.vms.get(d.vm)
        grace = 0.0 if stopping is None or stopping.spec.stop_force else self.cfg.stop_grace
        how = f"the guest is asked to power off, up to {grace:g} s" if grace > 0 else "powered off at once"
        self.event(d.vm, "stop", f"{d.reason}: {how}")
        self.history(d.vm, "stopped", d.reason)
        if rec.qemu:
            spawn(self.procs.stop(rec, rec.qemu, grace), name=f"stop-{d.vm}")

    async def _export(self, d: Decision, snapshot: PoolSnapshot) -> None:
        await self.exports.serve(snapshot.vms[d.vm].spec, d.reason)

    async def _unexport(self, d: Decision, snapshot: PoolSnapshot) -> None:
        await self.exports.withdraw(d.vm, d.reason)

    async def _release(self, d: Decision, snapshot: PoolSnapshot) -> None:
        assert d.token is not None
        if await self.store.release(d.vm, d.token):
            self.vms.pop(d.vm, None)
            self.event(d.vm, "release", d.reason)

    async def _replace_partner(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """The partner is gone for good: a new replica on `d.target` (built in full by the
        replica manager or, level 3, by a new pre-copy)."""
        copies = snapshot.vms[d.vm].copies
        if copies is None or d.token is None or d.target is None:
            return
        old = copies.partner_of(self.cfg.name)
        new = replace_partner(copies, old, d.target, time.time())
        if await self.store.set_copies(d.vm, d.token, copies, new) is not None:
            self.event(d.vm, "replace-partner", d.reason + (f"; {old}'s copy forgotten" if old else ""))
            self.wake.set()

    def _new_l3(self, vm: str, token: int, spec: VmSpec, paths: VmPaths, files: ReplicaPaths) -> L3Primary:
        """The checkpointing runtime of a level 3 VM this host runs, its checkpoints counted
        in this agent's metrics."""
        def count(n: int) -> None:
            self.counters.checkpoints[vm] = self.counters.checkpoints.get(vm, 0) + n
        return L3Primary(self.ctx.for_vm(vm, token), spec, paths, files, self._l3_link, count,
                         tracking=self.procs.tracking, track_disks=self.cfg.l3_tracking != "compare",
                         no_dr_points=self.dr.quiet)

    def _drop_stale_guest_ram(self, snapshot: PoolSnapshot) -> None:
        """Level 3 RAM files (tmpfs: real memory) of VMs removed or stopped and not run here."""
        root = self.cfg.guest_ram_dir
        if not root.is_dir():
            return
        for d in root.iterdir():
            if d.name.startswith(TRASH):  # set aside (below); left by a removal cut short
                self._free_guest_ram(d)
                continue
            if d.name in snapshot.frozen:
                continue  # its records say nothing certain: keep the replica
            if not (d / RAM_DIR_MARKER).is_file():
                continue  # not made by ftvm (or by an older one): never delete it
            view = snapshot.vms.get(d.name)
            rec = self.vms.get(d.name)
            if rec is not None and rec.state in ACTIVE_STATES:
                continue
            if view is None or (view.spec.desired is Desired.STOPPED and view.owner is None) or (
                    view.spec.level is not Level.SYSTEM and rec is None) or (  # lowered from 3 while running
                    rec is None and view.owner is not None and view.copies is not None
                    and self.cfg.name not in view.copies.copies):  # another host keeps its replica now
                if self.l3_partner is not None:
                    self.l3_partner.drop(d.name)
                # set aside at once, freed in a thread: freeing GiBs of tmpfs takes a while, and
                # the agent's loop must not stall (l3/stalls.py); a start here makes a new one
                trash = root / f"{TRASH}{d.name}-{uuid.uuid4().hex[:8]}"
                try:
                    d.rename(trash)
                except OSError:
                    continue
                self._free_guest_ram(trash)
                log.info("removed the level 3 RAM file of %s (%s)", d.name,
                         "VM removed" if view is None else "VM stopped")

    def _free_guest_ram(self, trash: Path) -> None:
        if trash.name in self._freeing:
            return
        self._freeing.add(trash.name)
        task = spawn(asyncio.to_thread(shutil.rmtree, trash, True), name=f"rm-{trash.name}")
        task.add_done_callback(lambda _: self._freeing.discard(trash.name))

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

    async def _report_status(self, snapshot: PoolSnapshot) -> None:
        for name, rec in self.vms.items():
            view = snapshot.vms.get(name)
            if view is None or view.owner is None or view.owner.host != self.cfg.name:
                continue
            detail = rec.detail
            if rec.replica is not None and rec.replica.problem:
                detail = f"PAUSED: {rec.replica.problem}"
            status = VmStatus(self.cfg.name, rec.state, rec.token, rec.since, detail, self.health.state_of(name))
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
