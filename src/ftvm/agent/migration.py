"""Live migration in the agent. Levels 0 and 1: disks on storage both hosts reach.
Level 2: to the partner, whose current copy the target QEMU opens (replication kept:
the old host's copy becomes the replica, resynced from the target's dirty bitmap).
Level 3: a planned switchover to the partner (`switch_over`): no QEMU migration
stream, the partner already holds the guest's state: the source stops the guest,
takes a final checkpoint, and hands over once the partner acknowledged it; the
partner resumes from that exact instant (as in a failover, but with nothing
lost to detection time), then protects the VM back to the old host.

    operator ── migration record (owner's lease) ──► target: QEMU -incoming, listening;
                                                     incoming record (target's lease)
    source: migrate ──► completed (guest paused here, every byte sent)
    source: hand over = one txn: still owner with its token AND target still listening
            -> owner, status, migration, incoming deleted; handover {target} (target's lease)
    target: claims (only it may: handover), waits for QEMU to finish loading, cont, announce
    source: kills its paused copy

If the target dies before the handover, the source's guest runs on (the txn fails
on `incoming`; it resumes). If the source dies, the migration and incoming records
go with its lease: the target's QEMU is killed (no handover) and the VM fails
over as usual. If the target dies after the handover, the handover key goes with
its lease and the VM fails over from storage, as for any lost host.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import replace
from typing import Any

from ..api.metrics import AgentCounters
from ..core.decide import Decision
from ..core.model import Incoming, Level, Migration, PoolSnapshot, RunState, VmStatus
from ..core.replication import may_start_on
from ..qemu.cmdline import VmPaths
from ..qemu.migrate import wait_migration
from ..qemu.process import QemuError, QemuVm, set_migration_tls
from ..qemu.storage_daemon import StorageDaemonError
from ..qemu.tls import MIGRATION_CLIENT, MIGRATION_SERVER
from ..store.etcd import EtcdError
from ..store.pool import PoolStore
from .config import AgentConfig
from .context import HostContext, VmContext
from .disks import HostDisks, IncomingDisks
from .exports import Exports
from .l3 import L3Partner, L3Primary
from .local import LocalRecord
from .processes import Processes
from .replica import replicate

log = logging.getLogger("ftvm.agent.migration")

MAX_BANDWIDTH = 1 << 30      # bytes/s: keep migrations short (FACTS: a 2 MB/s TCG migration once lost pages)
# QEMU 7.2's dirty-page tracking under TCG misses guest writes (FACTS.md; seen here as guest
# kernels crashing on corrupted page lists right after a live migration, about one move in
# eight on a loaded lab): a running guest copied page by page may arrive with stale pages.
# Under TCG every move of a running VM's RAM (live migration, the raise into a level 3
# QEMU) therefore copies it with the guest stopped: one pass, nothing can change behind it.
# The pause is the RAM's transfer time (about a second for 256 MiB here). KVM's dirty log
# is exact: there the guest runs during the copy.
STOPPED_COPY_WHY = "TCG's dirty tracking is not exact: RAM is copied with the guest stopped"
DOWNTIME_LIMIT_MS = 300
PROGRESS_EVERY_S = 0.5


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


async def listen_for(qemu: QemuVm, addr: str, late_activation: bool = False) -> Incoming:
    """Target: QEMU (started with -incoming defer) listens for the migration stream.
    `late_activation` (level 2: the target's disk is the copy this host's storage daemon
    still serves to the source): QEMU takes the image's write lock only at `cont`, after
    the agent stopped serving it, not when the stream ends."""
    port = free_port(addr)
    if late_activation:
        await qemu.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": "late-block-activate", "state": True}]})
    await set_migration_tls(qemu, MIGRATION_SERVER)  # only a source holding the migration key gets in
    await qemu.execute("migrate-incoming", {"uri": f"tcp:{addr}:{port}"})
    return Incoming(host="", addr=addr, port=port)


async def wait_received(qemu: QemuVm, timeout: float = 30.0) -> None:
    """Target, after the handover: QEMU has loaded every byte the source sent."""
    await wait_migration(qemu, "incoming migration", timeout=timeout, poll=0.005)


async def send(ctx: VmContext, qemu: QemuVm, migration: Migration, incoming: Incoming,
               keep_copies: bool = False, stopped_copy: bool = False) -> bool:
    """Source: migrate, then hand over. True if the VM now belongs to the target (the caller
    kills this paused copy); False if it still runs here (the migration failed or the
    target vanished), with the migration record removed.
    `keep_copies` (level 2): the target runs on its own copy, so the handover also requires
    that copy to be still recorded current, unchanged since it was checked (a replication
    failure during the transfer outdates it: the guest then stays here).
    `stopped_copy`: the guest is stopped for the whole transfer (see STOPPED_COPY_WHY)."""
    t0 = time.monotonic()
    try:
        if stopped_copy:
            await qemu.execute("stop")
        await qemu.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH,
                                                      "downtime-limit": DOWNTIME_LIMIT_MS})
        # a VM lowered from level 3 has its RAM in a shared file and its checkpointer had set
        # x-ignore-shared: here the RAM must travel
        await qemu.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False}]})
        await set_migration_tls(qemu, MIGRATION_CLIENT)
        await qemu.execute("migrate", {"uri": f"tcp:{incoming.addr}:{incoming.port}"})
        last = 0.0

        async def report(info: dict[str, Any]) -> None:
            nonlocal last
            if time.monotonic() - last > PROGRESS_EVERY_S:
                last = time.monotonic()
                ram = info.get("ram", {})
                total = int(ram.get("total", 0))
                done = total - int(ram.get("remaining", total))
                await ctx.store.update_migration(ctx.vm, ctx.token, replace(migration, phase="transferring", done=done,
                                                                total=total), ctx.lease)
        downtime = (await wait_migration(qemu, "migration", progress=report)).get("downtime", 0)
        snap = ctx.snapshot()
        target = snap.hosts.get(migration.to) if snap else None
        copies = await ctx.store.get_copies(ctx.vm) if keep_copies else None
        if keep_copies and not may_start_on(copies, migration.to)[0]:
            raise RuntimeError(f"{migration.to}'s copy of the disks is no longer current")
        if target is not None and await ctx.store.hand_over(ctx.vm, ctx.token, migration.to, target.lease_id, copies):
            pause = (f"guest stopped {time.monotonic() - t0:.2f}s: {STOPPED_COPY_WHY}" if stopped_copy
                     else f"QEMU downtime {downtime} ms")
            ctx.event("migrate", f"live migration to {migration.to} done in {time.monotonic() - t0:.2f}s "
                                 f"({pause}); handed over")
            return True
        raise RuntimeError(f"{migration.to} no longer listens (or this host lost the VM)")
    except Exception as e:  # QMP, etcd, network: whatever failed, the VM must run on here
        ctx.event("migrate", f"live migration to {migration.to} failed: {e}; the VM stays here")

        async def resume() -> None:
            status = await qemu.execute("query-status")
            if status.get("status") in ("postmigrate", "paused", "finish-migrate"):
                await qemu.execute("cont")
        await _stay_here(ctx.vm, ctx.store, resume)
        return False


async def _stay_here(vm: str, store: PoolStore, resume: Callable[[], Awaitable[None]]) -> None:
    """A move failed before the handover: the guest goes on here and the request is dropped."""
    try:
        await resume()
    except QemuError as e:
        log.warning("%s: could not resume after a failed move: %s", vm, e)
    with suppress(EtcdError):
        await store.end_migration(vm)


async def switch_over(ctx: VmContext, l3: L3Primary, migration: Migration) -> bool:
    """Level 3 source: final checkpoint (guest stopped, acknowledged), then the handover
    (still owner, target's standby announced, copies record unchanged: the target's copy
    current). True: the target owns the VM (the caller kills this paused copy). False:
    the guest runs on here, the migration record removed."""
    t0 = time.monotonic()
    try:
        await ctx.store.update_migration(ctx.vm, ctx.token, replace(migration, phase="handing over"), ctx.lease)
        partner, epoch = await l3.final_checkpoint()
        if partner != migration.to:
            raise RuntimeError(f"the replica is on {partner}, not {migration.to}")
        copies = await ctx.store.get_copies(ctx.vm)
        if not may_start_on(copies, migration.to)[0]:
            raise RuntimeError(f"{migration.to}'s replica is no longer current")
        snap = ctx.snapshot()
        target = snap.hosts.get(migration.to) if snap else None
        if target is not None and await ctx.store.hand_over(ctx.vm, ctx.token, migration.to, target.lease_id, copies):
            ctx.event("migrate", f"switched over to {migration.to} at checkpoint {epoch} in "
                                 f"{time.monotonic() - t0:.2f}s (guest stopped since the final checkpoint); "
                                 "handed over")
            return True
        raise RuntimeError(f"{migration.to} is no longer ready (or this host lost the VM)")
    except Exception as e:  # the VM must run on here
        ctx.event("migrate", f"switchover to {migration.to} failed: {e}; the VM stays here")
        await _stay_here(ctx.vm, ctx.store, l3.resume_after_switchover_failed)
        return False


FAILBACK_RETRY_S = 30.0  # a failback migration is asked at most this often per VM


class Migrations:
    """This host's part in live migrations and level 3 switchovers, as either side: the
    target's listening QEMU (or, level 3, its announced standby) and its resume after the
    handover; the source's transfer and handover; failbacks to a preferred host."""

    def __init__(self, host: HostContext, cfg: AgentConfig, procs: Processes, disks: HostDisks, exports: Exports,
                 counters: AgentCounters, l3_partner: Callable[[], L3Partner | None]) -> None:
        self.host, self.cfg, self.procs = host, cfg, procs
        self.disks, self.exports, self.counters = disks, exports, counters
        self.l3_partner = l3_partner
        self.store, self.me = host.store, host.me
        self._arriving: set[str] = set()          # handed to this host, not yet running here
        self._failback_at: dict[str, float] = {}  # monotonic time before which no failback is asked again

    def expect(self, vm: str) -> None:
        """This host claimed `vm` on a handover: its start is the end of a migration."""
        self._arriving.add(vm)

    def arrived(self, vm: str) -> bool:
        """Whether the start under way ends a migration here (asked once per start)."""
        arrived = vm in self._arriving
        self._arriving.discard(vm)
        return arrived

    def event(self, vm: str, kind: str, message: str) -> None:
        self.host.journal.event(vm, kind, message)

    async def prepare_incoming(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Target: a paused QEMU listening for the VM, announced under this host's lease.
        Level 3: the standby holding a committed checkpoint is what is announced."""
        view = snapshot.vms[d.vm]
        spec = view.spec
        if not self.cfg.replication_addr:
            self.event(d.vm, "error", "cannot receive a live migration: no replication_addr configured")
            return
        if spec.level is Level.SYSTEM:
            partner = self.l3_partner()
            if partner is None or not partner.holds_checkpoint(d.vm):
                return  # not yet: the next tick looks again (the source refuses if it never comes)
            ready = Incoming(self.me, self.cfg.replication_addr, self.cfg.checkpoint_port)
            if await self.store.publish_incoming(d.vm, ready, self.host.lease):
                self.event(d.vm, "incoming", f"{d.reason}: the replica here is current, ready for the switchover")
            return
        paths = VmPaths(self.cfg.state_dir / "vms" / d.vm)
        disks: IncomingDisks | None = None
        try:
            if spec.level is Level.COMPONENT:
                disks = self.disks.incoming(spec, view.copies)
            qemu = await self.procs.launch(spec, paths, incoming=True, blockdevs=disks.blockdevs if disks else None)
        except (QemuError, StorageDaemonError, OSError) as e:
            self.event(d.vm, "error", f"cannot start the migration target: {e}")
            return
        rec = LocalRecord(d.vm, 0, RunState.INCOMING, qemu=qemu, detail="receiving a live migration",
                          incoming_disks=disks)
        self.procs.vms[d.vm] = rec
        self.procs.watch(rec, qemu)
        try:
            incoming = await listen_for(qemu, self.cfg.replication_addr, late_activation=disks is not None)
            published = await self.store.publish_incoming(d.vm, replace(incoming, host=self.me), self.host.lease)
        except (QemuError, EtcdError) as e:
            published = False
            self.event(d.vm, "error", f"cannot listen for the migration: {e}")
        if not published:
            rec.state = RunState.STOPPING
            qemu.kill()
            return
        self.event(d.vm, "incoming", f"{d.reason}: QEMU pid {qemu.pid} listens on {incoming.addr}:{incoming.port}")

    async def migrate_out(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Source: move the VM to the target that announced itself, or go on here."""
        view = snapshot.vms[d.vm]
        rec = self.procs.vms.get(d.vm)
        if rec is None or rec.qemu is None or view.migration is None or view.incoming is None:
            return
        assert d.token is not None
        ctx = self.host.for_vm(d.vm, d.token)
        # (a VM lowered from level 3 keeps its relays: it migrates like any other of its level)
        if view.spec.level is Level.SYSTEM and rec.l3 is not None:
            moved = await switch_over(ctx, rec.l3, view.migration)
            if moved:
                await rec.l3.hand_off()
        else:
            moved = await send(ctx, rec.qemu, view.migration, view.incoming,
                               keep_copies=view.spec.level is Level.COMPONENT,
                               stopped_copy=self.procs.inexact_dirty_tracking)
        if moved:
            rec.state, rec.detail = RunState.STOPPING, f"migrated to {view.migration.to}"
            rec.qemu.kill()  # paused since the migration completed; the target runs the VM

    async def resume_incoming(self, d: Decision, rec: LocalRecord) -> None:
        """Target, after the handover and this host's claim: run the received VM."""
        assert d.token is not None and rec.qemu is not None
        qemu = rec.qemu
        starting = VmStatus(self.me, RunState.STARTING, d.token, time.time(), d.reason)
        if not self.procs.guard.may_run() or not await self.store.report_status(d.vm, starting, self.host.lease):
            return
        disks = rec.incoming_disks
        try:
            await wait_received(qemu)
            if disks is None:
                await qemu.execute("cont")
            else:  # level 2: on this host's copy, tracking every write for the old host's resync
                await self.exports.withdraw(d.vm)
                rec.replica = await replicate(self.host.for_vm(d.vm, d.token), qemu, disks.images, disks.graphs)
        except Exception as e:  # noqa: BLE001 - QMP, NBD, etcd: whatever failed, this copy must not run
            rec.state, rec.detail = RunState.CRASHED, f"resuming the migrated VM failed: {e}"
            if rec.replica is not None:
                rec.replica.stop()
            qemu.kill()
            self.event(d.vm, "error", rec.detail)
            return
        self.procs.guard.register(d.vm, qemu.pidfd)
        with suppress(QemuError):
            await qemu.announce()
        rec.token, rec.state, rec.since = d.token, RunState.RUNNING, time.time()
        rec.detail = self.procs.describe(qemu)
        self.counters.migrations[d.vm] = self.counters.migrations.get(d.vm, 0) + 1
        self.host.journal.history(d.vm, "up", "live migration")
        self.event(d.vm, "start", f"{d.reason}: QEMU pid {qemu.pid} runs the migrated VM (token {d.token})")

    async def ask_failback(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Ask the live migration back to the preferred host (not again for a while if one
        was asked recently: a failing move must not repeat every tick)."""
        if d.token is None or d.target is None or time.monotonic() < self._failback_at.get(d.vm, 0.0):
            return
        self._failback_at[d.vm] = time.monotonic() + FAILBACK_RETRY_S
        m = Migration(to=d.target, source=self.me, token=d.token, started=time.time())
        if await self.store.request_migration(d.vm, d.token, m, self.host.lease):
            self.event(d.vm, "failback", f"{d.reason}: live migration back to {d.target} asked")
            self.host.wake()
