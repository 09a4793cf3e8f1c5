"""Level 2 data plane on the primary: keep the partner's copy in step, mask failures.

One `ReplicaManager` per running level 2 VM. Its loop:

  * the VM stopped on an I/O error (werror=stop; a copy failed under the quorum):
    record the failed copy in etcd first (outdated or failed, generation bumped),
    then drop it from the block graph and continue on the survivor. Until the
    record is committed the VM stays stopped: no write is ever acknowledged with
    one copy while the other is still believed current.
  * LOCAL_ONLY and the partner serves its copy: resync. Passes of a backup job
    copy what the dirty bitmap says changed (or everything, for a full resync)
    while the guest runs; the last pass runs with the VM stopped, then the disk
    is switched to MIRRORED and the partner's copy recorded current.
  * MIRRORED: watch the partner. When its export disappears from the store or
    its port stops answering, abort the replication connection so a write in
    flight fails now (and is handled as above) instead of after TCP's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

from ..core.model import Export
from ..core.model import SyncProgress
from ..core.replica_steps import Step, next_step
from ..core.replication import Copies, CopyState, mark
from ..core.sites import cut_check_s, renewed_since, yields_in_cut
from ..qemu.blockgraph import (DiskGraph, LocalImage, Mode, NbdTarget, QmpStep, add_local, add_remote, drop_child,
                               mirror, mirror_back, node_kind)
from ..qemu.process import QemuError, QemuVm
from ..qemu.storage_daemon import ensure_image, export_name, nbd_answers, writable_copy
from ..store.etcd import EtcdError
from ..store.pool import OwnershipLost
from .context import VmContext

log = logging.getLogger("ftvm.replica")

BITMAP = "resync"
BITMAP_GRANULARITY = 4096
FINAL_PASS_BYTES = 4 << 20   # stop the guest for the last pass once this little is left
MAX_PASSES = 8
PROBE_INTERVAL = 0.5
PROBE_FAILURES = 2
IO_RETRY_FIRST_S = 5.0   # a guest paused on an I/O error nothing masks: its I/O retried after this,
IO_RETRY_MAX_S = 60.0    # then twice as long each time, up to this


@dataclass
class ResyncFigures:
    copied: int = 0          # bytes the resync jobs copied
    written_apart: int = 0   # bytes the guest wrote while the partner was apart
    full: bool = False
    seconds: float = 0.0


class ReplicaManager:
    def __init__(self, ctx: VmContext, qemu: QemuVm, images: list[LocalImage], graphs: list[DiskGraph]) -> None:
        self.ctx = ctx
        self.vm, self.token, self.me = ctx.vm, ctx.token, ctx.me
        self.qemu = qemu
        self.images = images
        self.graphs = graphs
        self.store = ctx.store
        self.event = ctx.event
        self.failed_nodes: set[str] = set()
        self.wake = asyncio.Event()
        self.jobs: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.last_resync: ResyncFigures | None = None
        self._apart_since_wr: int | None = None  # guest bytes written when the partner left
        self._task: asyncio.Task[None] | None = None
        self.problem = ""  # why the VM is paused, if it is
        self.io_retry_first_s = IO_RETRY_FIRST_S
        self._io_retry_s = 0.0
        self._io_retry_at = 0.0
        self._io_resumed_at = -IO_RETRY_MAX_S
        self.yielded: str | None = None  # QEMU stopped so the partner's site keeps the VM: why

    # --- plumbing ----------------------------------------------------------------
    def _copies_view(self) -> tuple[Copies | None, tuple[Export, ...]]:
        """The copies record and the partners' exports, as the last tick saw them."""
        view = self.ctx.view()
        return (view.copies, view.exports) if view else (None, ())

    def _repair_requested(self) -> bool:
        """The operator said this host's failed copy was replaced (`vm repair-disk`)."""
        view = self.ctx.view()
        return view is not None and view.repair_host == self.me

    async def begin(self) -> None:
        """The VM was started paused on its local copies: track every guest write from the
        first one (the partner's resync needs them), let the guest run, start the loop."""
        for g in self.graphs:
            assert g.local is not None
            await self._add_bitmap(g.local)
        self._apart_since_wr = await self._written_bytes()  # the partner is behind from here on
        await self.qemu.execute("cont")
        self._task = asyncio.create_task(self._run(), name=f"replica-{self.vm}")

    async def adopt(self, status: str) -> None:
        """A VM the previous agent left running (agent/adoption.py), `status` QEMU's run state:
        what that agent had under way on the graph is undone, or finished the safe way, then
        the loop goes on. A resync cut short is cancelled and the copy it was writing is
        resynced in full (its bitmap may be part consumed); a local copy without its bitmap
        means writes nobody tracked: the partner is resynced in full; a paused mirrored VM
        whose partner is recorded behind finishes dropping it; a guest stopped on an I/O
        error is continued once, so QEMU retries the write and names the failed copy again."""
        cut_short = await self._cancel_resync_jobs()
        copies, _ = self._copies_view()
        partner = copies.partner_of(self.me) if copies else None
        behind = [self.me] if self.mode is Mode.REMOTE_ONLY else []
        untracked = False
        if self.mode is Mode.LOCAL_ONLY:
            bitmaps = {(str(n.get("node-name")), str(b.get("name")))
                       for n in await self.qemu.execute("query-named-block-nodes", {"flat": True})
                       for b in n.get("dirty-bitmaps", [])}
            for g in self.graphs:
                if g.local is not None and (g.local, BITMAP) not in bitmaps:
                    await self._add_bitmap(g.local)
                    untracked = True
        if partner is not None and (untracked or (cut_short and self.mode is Mode.LOCAL_ONLY)):
            behind.append(partner)
        why = "resync cut short by an agent restart" if cut_short else "writes not tracked across an agent restart"
        for host in behind if cut_short or untracked else []:
            def outdated(c: Copies, h: str = host) -> Copies:
                return mark(c, h, CopyState.OUTDATED, why, time.time(), full=True)
            await self._update_copies(outdated)
        if status == "io-error":
            await self.qemu.execute("cont")  # (QEMU retries the failed request: the events come again)
        elif status == "paused":
            c = copies.state_of(partner) if copies and partner else None
            if self.mode is Mode.MIRRORED and c is not None and c.state is not CopyState.CURRENT:
                self._pending_drop = "remote"  # the loop finishes it (FINISH_DROP)
            else:
                await self.qemu.execute("cont")
        self._task = asyncio.create_task(self._run(), name=f"replica-{self.vm}")

    async def _cancel_resync_jobs(self) -> bool:
        """End the resync jobs on this QEMU and remove their spare nodes; True if there were any."""
        jobs = [j for j in await self.qemu.execute("query-block-jobs")
                if str(j.get("device", "")).startswith("resync-")]
        for job in jobs:
            with suppress(QemuError):
                await self.qemu.execute("block-job-cancel", {"device": job["device"], "force": True})
        for _ in range(500):
            if not any(str(j.get("device", "")).startswith("resync-")
                       for j in await self.qemu.execute("query-block-jobs")):
                break
            await asyncio.sleep(0.01)
        in_use = {n for g in self.graphs for n in (g.local, g.remote, g.quorum) if n}
        for node in await self.qemu.execute("query-named-block-nodes", {"flat": True}):
            name = str(node.get("node-name", ""))
            if re.fullmatch(r"d\d+-(remote|local)\d+", name) and name not in in_use:
                with suppress(QemuError):
                    await self.qemu.execute("blockdev-del", {"node-name": name})
        return bool(jobs)

    async def _add_bitmap(self, node: str) -> None:
        await self.qemu.execute("block-dirty-bitmap-add", {"node": node, "name": BITMAP,
                                                            "granularity": BITMAP_GRANULARITY})

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def restart(self) -> None:
        """The loop again, after a `release()` that was given up."""
        self._task = asyncio.create_task(self._run(), name=f"replica-{self.vm}")

    async def release(self) -> list[DiskGraph]:
        """Lowering the level: stop keeping the partner's copy. The loop ends, a resync under
        way is cancelled and its spare nodes removed. Returns the disks' graphs (MIRRORED
        or LOCAL_ONLY; the caller drops the partner from a mirrored one with the guest
        stopped). RuntimeError if the VM runs on the partner's copy (its own failed)."""
        if self._task is not None:
            # again until it ends: Python 3.11's wait_for can swallow a cancellation that comes
            # as the awaited thing completes (seen: a raise to level 3 waited 2 minutes here)
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.1)
        await self._cancel_resync_jobs()
        if any(g.mode is Mode.REMOTE_ONLY for g in self.graphs):
            self.restart()
            raise RuntimeError(f"the VM runs on the partner's copy (its local disk on {self.me} failed): "
                               f"repair it first (`ftvm vm repair-disk {self.vm} --host {self.me}`)")
        return self.graphs

    async def partner_outdated(self, why: str) -> None:
        """Record the partner's copy outdated, to be resynced in full (retried until done)."""
        copies, _ = self._copies_view()
        partner = copies.partner_of(self.me) if copies else None
        if partner is not None:
            await self._update_copies(lambda c: mark(c, partner, CopyState.OUTDATED, why, time.time(), full=True))

    def partner_export(self, index: int) -> NbdTarget:
        copies, exports = self._copies_view()
        partner = copies.partner_of(self.me) if copies else None
        return self._export_for(exports, partner or "", index)

    def on_qemu_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "QUORUM_REPORT_BAD" and data.get("node-name"):
            self.failed_nodes.add(str(data["node-name"]))
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            fut = self.jobs.get(str(data.get("device")))
            if fut is not None and not fut.done():
                fut.set_result(data)
        if name in ("BLOCK_IO_ERROR", "QUORUM_REPORT_BAD", "STOP"):
            self.wake.set()

    @property
    def mode(self) -> Mode:
        modes = {g.mode for g in self.graphs}
        return modes.pop() if len(modes) == 1 else Mode.LOCAL_ONLY

    async def _run(self) -> None:
        probe_failures = 0
        while not self.yielded:
            with suppress(TimeoutError):  # (asyncio.timeout: no lost cancellation, unlike 3.11's wait_for)
                async with asyncio.timeout(PROBE_INTERVAL):
                    await self.wake.wait()
            self.wake.clear()
            try:
                status = (await self.qemu.execute("query-status"))["status"]
                copies, exports = self._copies_view()
                step = next_step(status, self.mode.value, bool(self._pending_drop), copies, exports, self.me,
                                 self._repair_requested())
                if step.step is Step.IO_ERROR:
                    await self._handle_io_error()
                elif step.step is Step.FINISH_DROP and self._pending_drop:
                    await self._drop_copy(self._pending_drop)  # an earlier attempt failed midway
                elif step.step is Step.WATCH_PARTNER:
                    if step.mark_current and step.partner:
                        # mirrored since the last resync pass, but the record was not written then
                        await self._mark_partner_current(step.partner)
                    if step.export is None or not await _port_answers(step.export):
                        probe_failures += 1
                        log.info("%s: partner %s probe failed (%d)", self.vm, step.partner, probe_failures)
                    else:
                        probe_failures = 0
                    if probe_failures >= PROBE_FAILURES or (step.export is None and probe_failures):
                        probe_failures = 0
                        await self._partner_lost(step.partner)
                elif step.step is Step.RECORD_REPAIR:
                    await self._update_copies(lambda c: mark(
                        c, self.me, CopyState.OUTDATED, "local disk replaced by the operator", time.time(), full=True))
                    await self.store.clear_repair(self.vm)
                    self.event("repair", f"operator replaced the local disk on {self.me}: full resync follows")
                elif step.step is Step.RESYNC_LOCAL:
                    assert step.partner is not None and step.export is not None
                    await self._resync_local(step.partner, step.export)
                elif step.step is Step.RESYNC_PARTNER:
                    assert step.partner is not None and step.export is not None
                    # Only a partner that greets is connected: QEMU 7.2's blockdev-add of an NBD
                    # node waits, with no timeout and its main loop stuck, for a server that
                    # accepts but never speaks (a hung daemon).
                    if await _port_answers(step.export):
                        await self._resync(step.partner, step.export, step.full)
            except asyncio.CancelledError:
                raise
            except EtcdError as e:
                log.warning("%s: quorum service unreachable during replication work: %s", self.vm, e)
            except Exception as e:  # keep the loop alive: the next round retries
                log.exception("%s: replication step failed", self.vm)
                self.event("replica", f"replication step failed: {e}")
                await asyncio.sleep(1.0)

    async def _update_copies(self, change: Callable[[Copies], Copies]) -> Copies:
        """Compare-and-set the copies record under our fencing token, retrying until
        etcd answers (the VM stays stopped meanwhile when that matters)."""
        while True:
            try:
                return await self.store.update_copies(self.vm, self.token, change)
            except EtcdError as e:
                log.warning("%s: cannot record the copies' state yet (%s); VM kept as is", self.vm, e)
                await asyncio.sleep(0.2)

    async def _mark_partner_current(self, partner: str) -> None:
        await self._update_copies(lambda c: mark(c, partner, CopyState.CURRENT, "in sync", time.time()))

    # --- failures ----------------------------------------------------------------
    async def _handle_io_error(self) -> None:
        kinds = {k for g in self.graphs if g.mode is Mode.MIRRORED
                 for k in (node_kind(g, n) for n in self.failed_nodes) if k}
        if not kinds or kinds == {"local", "remote"}:
            await self._retry_io("both copies failed" if kinds else "I/O error on an unmirrored disk")
            return
        await self._drop_copy(kinds.pop())

    async def _retry_io(self, why: str) -> None:
        """Nothing left to continue on: the guest stays paused, and its failed I/O is retried
        now and then (after 5 s, then twice as long each time, up to a minute), as oVirt's
        auto-resume does. Safe: QEMU keeps the failed request (werror=stop) and retries it on
        `cont`; if it fails again the guest stops again, so nothing is acknowledged that was
        not written. A storage path that comes back (a cable, a controller reset, a full
        disk given room) then needs no operator."""
        now = time.monotonic()
        if self.problem != why:
            self.problem = why
            # a failure soon after a retry went through: the storage flaps, so no faster retries
            recent = now - self._io_resumed_at < IO_RETRY_MAX_S
            self._io_retry_s = min(self._io_retry_s * 2, IO_RETRY_MAX_S) if recent else self.io_retry_first_s
            self._io_retry_at = now + self._io_retry_s
            self.event("io-error", f"VM paused: {why}; nothing left to continue on (its I/O is retried "
                                   f"after {self._io_retry_s:g} s, then less and less often)")
        elif now >= self._io_retry_at:
            self._io_retry_s = min(self._io_retry_s * 2, IO_RETRY_MAX_S)
            self._io_retry_at = now + self._io_retry_s
            if not await self.store.owned(self.vm, self.token):  # (only the owner's guest may go on)
                raise OwnershipLost(f"this host no longer owns VM {self.vm} under token {self.token}")
            self.failed_nodes.clear()  # (a retry that fails again names its copies again)
            await self.qemu.execute("cont")
            await asyncio.sleep(1.0)  # (the retried request fails again within this, if it does)
            if (await self.qemu.execute("query-status"))["status"] == "running":
                self.problem = ""
                self._io_resumed_at = time.monotonic()
                self.event("io-resumed", f"the I/O that failed ({why}) went through on a retry: the guest "
                                         f"continues")
            return
        await asyncio.sleep(min(1.0, max(0.05, self._io_retry_at - now)))

    async def _partner_lost(self, partner: str | None) -> None:
        """The partner stopped answering. Abort the replication connection, so a write in
        flight fails now; with no write in flight, stop the guest ourselves: either way
        the replica is recorded outdated before the guest writes again."""
        self._abort_replication(partner)
        await asyncio.sleep(0.2)
        if (await self.qemu.execute("query-status"))["status"] == "io-error":
            return  # the loop handles it as any failed write
        await self.qemu.execute("stop")
        if self.mode is Mode.MIRRORED:
            await self._drop_copy("remote")
        else:
            await self.qemu.execute("cont")

    _pending_drop: str | None = None

    async def _drop_copy(self, failed: str) -> None:
        """With the guest stopped: record the failed copy, drop it from the graph, continue.
        If this fails midway the guest stays stopped and the loop tries again."""
        if failed == "remote" and self._pending_drop is None and await self._yield_to_partner():
            return
        self._pending_drop = failed
        copies, exports = self._copies_view()
        partner = copies.partner_of(self.me) if copies else None
        if partner is None:
            raise RuntimeError("mirrored disk without a partner")
        now = time.time()
        if failed == "remote":
            why = f"replication to {partner} failed"
            await self._update_copies(lambda c: mark(c, partner, CopyState.OUTDATED, why, now))
        else:
            why = f"local disk on {self.me} failed (I/O error)"
            await self._update_copies(lambda c: mark(c, self.me, CopyState.FAILED, why, now, full=True))
        wr_before = await self._written_bytes()
        for i, g in enumerate(self.graphs):
            if g.mode is Mode.MIRRORED:
                g = self.graphs[i] = replace(g, serial=g.serial + 2)  # fresh node names if this is a retry
                new, steps = drop_child(g, failed, self.images[i], self._export_for(exports, partner, i))
                await self._run_steps(steps)
                self.graphs[i] = new
                if new.mode is Mode.LOCAL_ONLY and new.local:
                    await self._add_bitmap(new.local)
        if failed == "remote":
            self._apart_since_wr = wr_before
        self.failed_nodes.clear()
        self.problem = ""
        self._pending_drop = None
        await self.qemu.execute("cont")
        survivor = "its local copy" if failed == "remote" else f"the copy on {partner}"
        self.event("masked", f"{why}: copy recorded {'outdated' if failed == 'remote' else 'failed'} "
                             f"in the store, VM continues on {survivor}")

    async def _yield_to_partner(self) -> bool:
        """SplitSite (core/sites.py): at another site than the VM's preferred one, with the
        partner there, the partner keeps the VM if it still reaches the quorum service (it
        renews its lease after the link was lost). With the guest stopped, nothing it wrote
        since is acknowledged: QEMU is stopped, and the tick releases the VM to the partner."""
        snap = self.ctx.snapshot()
        view = snap.vms.get(self.vm) if snap else None
        why = yields_in_cut(snap, view, self.me) if snap and view else None
        if why is None or view is None or view.copies is None:
            return False
        partner = view.copies.partner_of(self.me)
        assert partner is not None
        wait = cut_check_s(self.ctx.host.timing.keepalive_interval)
        self.event("site", f"{why}; guest stopped while checking that {partner} still renews its lease "
                           f"(in {wait:g} s)")
        await asyncio.sleep(wait)
        try:
            lease = await self.store.host_lease_left(partner)
        except EtcdError as e:
            self.event("site", f"cannot ask the quorum service about {partner} ({e}): its copy is to be "
                               "recorded outdated (the guest waits for the quorum service)")
            return False
        if lease is None or not renewed_since(lease[0], lease[1], wait):
            self.event("site", f"{partner} no longer renews its lease: its site is lost, not cut off; "
                               "the VM carries on here")
            return False
        self.yielded = why
        self.ctx.host.journal.history(self.vm, "down", f"stopped here: {why}")
        self.event("yield", f"{why}: QEMU stopped here, the VM is left to {partner} (its copy is current)")
        self.qemu.stop_requested = True  # (the tick then releases it: core/decide.py)
        self.qemu.kill()
        return True

    def _abort_replication(self, partner: str | None) -> None:
        """Kill the TCP connections to the partner's replication address: in-flight
        writes fail at once and are handled like any other replica failure."""
        _, exports = self._copies_view()
        addr = next((e.addr for e in exports if e.host == partner), None) or self._last_addr
        if not addr:
            return
        subprocess.run(["ss", "-K", "dst", addr], capture_output=True)
        self.event("replica", f"partner {partner} not answering: replication connection aborted")

    _last_addr = ""
    _last_port = 0

    def _export_for(self, exports: tuple[Export, ...], host: str, index: int) -> NbdTarget:
        rec = next((e for e in exports if e.host == host), None)
        addr, port = (rec.addr, rec.port) if rec else (self._last_addr, self._last_port)
        return NbdTarget(addr, port, export_name(self.vm, index))

    async def _written_bytes(self) -> int:
        stats = await self.qemu.execute("query-blockstats", {"query-nodes": False})
        return sum(int(s.get("stats", {}).get("wr_bytes", 0)) for s in stats)

    async def _run_steps(self, steps: list[tuple[str, dict[str, Any]]]) -> None:
        for cmd, args in steps:
            await self.qemu.execute(cmd, args)

    # --- resync ------------------------------------------------------------------
    async def _resync(self, partner: str, rec: Export, full: bool) -> None:
        t0 = time.time()
        self._last_addr, self._last_port = rec.addr, rec.port
        spares: list[str] = []
        for i, g in enumerate(self.graphs):
            new, steps, spare = add_remote(g, NbdTarget(rec.addr, rec.port, export_name(self.vm, i)))
            try:
                await self._run_steps(steps)
            except Exception as e:
                for s in spares:
                    with suppress(QemuError):
                        await self.qemu.execute("blockdev-del", {"node-name": s})
                log.info("%s: partner export not reachable yet: %s", self.vm, e)
                return
            self.graphs[i] = new
            spares.append(spare)
        await self._update_copies(lambda c: mark(c, partner, CopyState.SYNCING,
                                                 "full resync" if full else "resync of changed blocks",
                                                 time.time(), full=full))
        self.event("resync", f"resync of the copy on {partner} started ({'full' if full else 'changed blocks'})")
        figures = ResyncFigures(full=full)

        async def commit() -> None:
            if self._apart_since_wr is not None:
                figures.written_apart = await self._written_bytes() - self._apart_since_wr
            await self._mark_partner_current(partner)

        try:
            figures.copied = await self._sync_and_mirror(
                [g.local or "" for g in self.graphs], spares, full, False, partner, Mode.LOCAL_ONLY,
                lambda i, g, spare: mirror(g, spare, self.images[i]), commit)
        except Exception:
            await self._update_copies(lambda c: mark(c, partner, CopyState.OUTDATED, "resync interrupted",
                                                     time.time(), full=full))
            raise
        finally:
            with suppress(EtcdError):
                await self.store.report_sync(self.vm, self.token, None, self.ctx.lease)
        figures.seconds = round(time.time() - t0, 3)
        self._apart_since_wr = None
        self.last_resync = figures
        self.event("in-sync", f"copy on {partner} in sync: resync copied {figures.copied} bytes "
                              f"({'full' if full else f'{figures.written_apart} bytes written while apart'}) "
                              f"in {figures.seconds:.1f}s; disks mirrored")

    async def _resync_local(self, partner: str, rec: Export) -> None:
        """REMOTE_ONLY after the operator replaced the local disk: copy the partner's copy
        (which the guest runs on) into a local one, then mirror again."""
        t0 = time.time()
        spares: list[str] = []
        for i, g in enumerate(self.graphs):
            ensure_image(self.images[i], await self.qemu.disk_size(i))
            self.qemu.give(self.images[i].path)
            # a replaced disk's new file is made write-through again (if this copy was)
            self.images[i] = writable_copy(self.images[i], self.images[i].write_through)
            new, steps, spare = add_local(g, self.images[i])
            await self._run_steps(steps)
            self.graphs[i] = new
            spares.append(spare)
        await self._update_copies(lambda c: mark(c, self.me, CopyState.SYNCING, "full resync of the local copy",
                                                 time.time(), full=True))
        self.event("resync", f"full resync of the local copy on {self.me} from {partner} started")

        async def commit() -> None:
            await self._update_copies(lambda c: mark(c, self.me, CopyState.CURRENT, "in sync", time.time()))

        try:
            copied = await self._sync_and_mirror(
                [g.remote or "" for g in self.graphs], spares, True, True, self.me, Mode.REMOTE_ONLY,
                lambda i, g, spare: mirror_back(g, spare, NbdTarget(rec.addr, rec.port, export_name(self.vm, i))),
                commit)
        except Exception:
            await self._update_copies(lambda c: mark(c, self.me, CopyState.OUTDATED, "local resync interrupted",
                                                     time.time(), full=True))
            raise
        finally:
            with suppress(EtcdError):
                await self.store.report_sync(self.vm, self.token, None, self.ctx.lease)
        self.event("in-sync", f"local copy on {self.me} in sync: resync copied {copied} bytes (full) "
                              f"in {time.time() - t0:.1f}s; disks mirrored")

    async def _sync_and_mirror(self, sources: list[str], spares: list[str], full: bool, new_bitmap: bool,
                               host: str, spare_mode: Mode,
                               switch: Callable[[int, DiskGraph, str], tuple[DiskGraph, list[QmpStep]]],
                               commit: Callable[[], Awaitable[None]]) -> int:
        """Backup passes from `sources` (the nodes the guest writes through) to `spares` while
        the guest runs, the first full or from the bitmap, until little is dirty; then, with the
        guest stopped, a last pass, the switch of every disk to MIRRORED and `commit` (the store
        records the copy current), and the guest continues. Returns the bytes copied. On failure
        the spares not yet mirrored are removed and the error propagates."""
        try:
            copied = await self._pass(sources, spares, full, host, new_bitmap=new_bitmap)
            for _ in range(MAX_PASSES - 1):
                if await self._dirty_bytes(sources) <= FINAL_PASS_BYTES:
                    break
                copied += await self._pass(sources, spares, False, host)
            await self.qemu.execute("stop")
            try:
                copied += await self._pass(sources, spares, False, host)
                for i, g in enumerate(self.graphs):
                    new, steps = switch(i, g, spares[i])
                    await self._run_steps(steps)
                    self.graphs[i] = new
                await commit()
            finally:
                await self.qemu.execute("cont")
        except Exception:
            for i, g in enumerate(self.graphs):
                if g.mode is spare_mode:
                    with suppress(QemuError):
                        await self.qemu.execute("blockdev-del", {"node-name": spares[i]})
            raise
        return copied

    async def _dirty_bytes(self, sources: list[str]) -> int:
        total = 0
        nodes = await self.qemu.execute("query-named-block-nodes", {"flat": True})
        for n in nodes:
            if n.get("node-name") in sources:
                total += sum(int(b.get("count", 0)) for b in n.get("dirty-bitmaps", [])
                             if b.get("name") == BITMAP)
        return total

    async def _pass(self, sources: list[str], spares: list[str], full: bool, partner: str,
                    new_bitmap: bool = False) -> int:
        """One backup pass per disk from the node the guest writes through to the spare
        (dirty blocks, or all of it); returns bytes copied. A full pass clears the
        bitmap (or, `new_bitmap`, creates it) in the same transaction that starts it."""
        copied = 0
        for i, source in enumerate(sources):
            job = f"resync-{self.vm}-d{i}"
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self.jobs[job] = fut
            backup: dict[str, Any] = {"job-id": job, "device": source, "target": spares[i],
                                      "auto-dismiss": True}
            if full:
                backup["sync"] = "full"
                bitmap = ({"type": "block-dirty-bitmap-add", "data": {
                              "node": source, "name": BITMAP, "granularity": BITMAP_GRANULARITY}}
                          if new_bitmap else
                          {"type": "block-dirty-bitmap-clear", "data": {"node": source, "name": BITMAP}})
                await self.qemu.execute("transaction", {"actions": [
                    bitmap, {"type": "blockdev-backup", "data": backup}]})
            else:
                backup.update(sync="bitmap", bitmap=BITMAP, **{"bitmap-mode": "on-success"})
                await self.qemu.execute("blockdev-backup", backup)
            t0 = time.time()
            while not fut.done():
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), 0.5)
                if not fut.done():
                    await self._report_progress(job, partner, full, t0)
            result = fut.result()
            self.jobs.pop(job, None)
            if result.get("error"):
                raise RuntimeError(f"resync pass failed: {result['error']}")
            copied += int(result.get("len", 0))
        return copied

    async def _report_progress(self, job: str, partner: str, full: bool, t0: float) -> None:
        for j in await self.qemu.execute("query-block-jobs"):
            if j.get("device") == job:
                done, total = int(j.get("offset", 0)), int(j.get("len", 0))
                rate = done / max(0.001, time.time() - t0)
                with suppress(EtcdError):
                    await self.store.report_sync(self.vm, self.token,
                                                 SyncProgress(partner, done, total, rate, full), self.ctx.lease)


async def replicate(ctx: VmContext, qemu: QemuVm, images: list[LocalImage], graphs: list[DiskGraph]) -> ReplicaManager:
    """Level 2 on a QEMU started (or left) paused on this host's copies: writes tracked from
    the first one, the guest continued, the replica kept. The one way a replica manager starts."""
    replica = ReplicaManager(ctx, qemu, images, graphs)
    await replica.begin()
    return replica


async def _port_answers(export: Export, timeout: float = 0.5) -> bool:
    """The partner's NBD server greets within `timeout` (a hung one still accepts)."""
    return await nbd_answers(asyncio.open_connection(export.addr, export.port), timeout)
