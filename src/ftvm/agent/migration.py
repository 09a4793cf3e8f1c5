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

from ..core.model import Incoming, Migration
from ..core.replication import may_start_on
from .l3 import L3Primary
from ..qemu.migrate import wait_migration
from ..qemu.process import QemuVm, set_migration_tls
from ..qemu.tls import MIGRATION_CLIENT, MIGRATION_SERVER
from ..store.etcd import EtcdError
from ..store.pool import PoolStore
from .context import VmContext

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
    except Exception as e:
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
