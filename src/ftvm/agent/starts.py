"""Starting a VM on this host at its level: the fencing check, the disks (level 2: this
host's copy, current; level 3: its files, and whether a committed checkpoint lets the
guest carry on), QEMU, the data plane (replication, checkpointing), and the start
recorded. A failed start backs off (core/restart.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..api.metrics import AgentCounters
from ..core.decide import Decision
from ..core.model import Level, PoolSnapshot, RunState, VmSpec, VmStatus
from ..core.replication import Copies, CopyState, brand_new_on, mark
from ..core.restart import backoff
from ..l3.relay import OutputCommitRelay
from ..l3.standby import ReplicaPaths, make_guest_ram_dir, read_committed
from ..qemu.blockgraph import DiskGraph, LocalImage, local_only_start
from ..qemu.cmdline import Checkpointed, VmPaths, checkpointed_disk_nodes, tap_names
from ..qemu.process import QemuError, QemuVm, ensure_tap, remove_tap
from ..qemu.storage_daemon import StorageDaemonError, ensure_image
from ..store.etcd import EtcdError
from ..store.pool import OwnershipLost
from .config import AgentConfig
from .context import HostContext
from .disks import HostDisks
from .exports import Exports
from .l3 import L3Partner, L3Primary, prepare_incoming
from .local import LocalRecord
from .migration import Migrations
from .paths import resolved_spec
from .processes import Processes
from .replica import replicate
from .warm import WarmQemu, machine_of

log = logging.getLogger("ftvm.agent.starts")

def l3_disk_nodes(files: ReplicaPaths) -> list[list[dict[str, Any]]]:
    return [checkpointed_disk_nodes(i, str(p)) for i, p in enumerate(files.disks)]


NewL3 = Callable[[str, int, VmSpec, VmPaths, ReplicaPaths], L3Primary]  # vm, token, spec, paths, files


class Starts:
    def __init__(self, host: HostContext, cfg: AgentConfig, procs: Processes, disks: HostDisks, exports: Exports,
                 migrations: Migrations, counters: AgentCounters, l3_partner: Callable[[], L3Partner | None],
                 new_l3: NewL3) -> None:
        self.host, self.cfg, self.procs, self.disks, self.exports = host, cfg, procs, disks, exports
        self.migrations, self.counters, self.l3_partner, self.new_l3 = migrations, counters, l3_partner, new_l3
        self.store, self.me = host.store, host.me

    async def start(self, d: Decision, snapshot: PoolSnapshot, failures: int) -> None:
        view = snapshot.vms[d.vm]
        spec = view.spec
        token = d.token
        assert token is not None
        # Fencing: the start is recorded only if we still own the VM under this token.
        starting = VmStatus(self.me, RunState.STARTING, token, time.time(), d.reason)
        if not self.procs.guard.may_run() or not await self.store.report_status(d.vm, starting, self.host.lease):
            log.warning("%s: not starting, ownership token %s no longer valid", d.vm, token)
            return
        rec = LocalRecord(d.vm, token, RunState.STARTING, reported=starting, failures=failures)
        self.procs.vms[d.vm] = rec
        paths = VmPaths(self.cfg.state_dir / "vms" / d.vm)
        graphs: list[DiskGraph] = []
        blockdevs = None
        images: list[LocalImage] = []
        l3: L3Primary | None = None
        checkpointed: Checkpointed | None = None
        warm: WarmQemu | None = None
        qemu: QemuVm | None = None
        resume = False
        try:
            spec = self._resolved(spec)
            if spec.level is Level.SYSTEM:
                l3, checkpointed, blockdevs, warm = await self._prepare_l3(spec, view.copies, token, paths)
                rec.l3, resume = l3, checkpointed.incoming
            elif spec.level is Level.COMPONENT:
                await self.exports.withdraw(d.vm)  # promoted partner: release the image first
                # A start under a token already held (a crash restarted here) runs on this copy
                # alone until a resync: the partner's copy must not stay recorded current. In
                # full: writes in flight when the old QEMU died may be here and not there.
                copies = await self._outdate_other_copies(d.vm, token, view.copies)
                images = self.disks.prepare(spec, copies)
                blockdevs = []
                for i, image in enumerate(images):
                    g, nodes = local_only_start(i, image)
                    graphs.append(g)
                    blockdevs.append(nodes)
            if warm is not None:  # started ahead on the replica (agent/warm.py)
                qemu = warm.qemu
            else:
                qemu = await self.procs.launch(spec, paths, blockdevs=blockdevs, paused=blockdevs is not None,
                                               checkpointed=checkpointed)
            # fenced from the guest's first instruction on (adopt, below, also watches its exit)
            self.procs.guard.register(d.vm, qemu.pidfd)
            if l3 is not None:
                if resume:
                    await l3.resume_from_replica(qemu, prepared=warm is not None)
                else:
                    await qemu.execute("cont")
        except BaseException as e:
            if qemu is not None:  # a QEMU that could not take the replica's state, or go on
                self.procs.guard.unregister(d.vm)  # (before its pidfd is closed)
                qemu.kill()
                await qemu.wait()
            if l3 is not None:
                await l3.close()
                rec.l3 = None
            if not isinstance(e, (QemuError, StorageDaemonError, OSError, RuntimeError)):
                raise
            rec.state, rec.detail, rec.exit_code = RunState.CRASHED, str(e), None
            retry = backoff(rec.failures, time.monotonic())
            rec.failures, rec.retry_at = retry.failures, retry.at
            self.host.journal.event(d.vm, "error", f"start failed: {e}; next try in "
                                      f"{rec.retry_at - time.monotonic():.1f}s")
            return
        rec.qemu = qemu
        self.procs.adopt(rec, qemu)
        if spec.level is Level.COMPONENT:  # (level 3 disks are blockdevs too, but checkpointed, not mirrored)
            rec.replica = await replicate(self.host.for_vm(d.vm, token), qemu, images, graphs)
        if l3 is not None:
            l3.begin(qemu)
        try:
            await qemu.announce()
        except QemuError as e:  # the guest still runs; the LAN learns from its traffic
            log.warning("%s: announce-self failed: %s", d.vm, e)
        rec.state, rec.detail, rec.since = RunState.RUNNING, self.procs.describe(qemu), time.time()
        arrived = self.migrations.arrived(d.vm)
        how = " resumed from the replica's last checkpoint (guest carries on)" if resume else " started"
        if warm is not None:
            how += f", in the QEMU started ahead {time.monotonic() - warm.started:.0f}s ago"
        if arrived:
            how = " resumed from the final checkpoint of the switchover (live migration)"
            self.counters.migrations[d.vm] = self.counters.migrations.get(d.vm, 0) + 1
            self.host.journal.history(d.vm, "up", "live migration")
        else:
            self.host.journal.history(d.vm, "up", "resumed from the last checkpoint" if resume else d.reason)
            if resume or d.failover:
                self.counters.failovers[d.vm] = self.counters.failovers.get(d.vm, 0) + 1
        self.host.journal.event(d.vm, "start", f"{d.reason}: QEMU pid {qemu.pid}{how} (token {token})")

    async def _prepare_l3(self, spec: VmSpec, copies: Copies | None, token: int, paths: VmPaths
                          ) -> tuple[L3Primary, Checkpointed, list[list[dict[str, Any]]], WarmQemu | None]:
        """Level 3: this host's files, whether to resume from a committed checkpoint, and the
        QEMU started ahead to resume in, if one fits (agent/warm.py). The checkpoint record
        is consumed by the start that uses it (a later restart on this host boots from the
        disk, which has moved on since)."""
        if self.cfg.local_storage is None:
            raise StorageDaemonError("this host has no local_storage configured for level 3 copies")
        files = self.disks.l3_files(spec)
        partner = self.l3_partner()
        warm: WarmQemu | None = None
        if partner is not None:  # this host runs the VM now: no standby of it here
            warm = await partner.warm.take(spec.name)
            partner.drop(spec.name)
        try:
            copies = await self._outdate_other_copies(spec.name, token, copies)
            committed = read_committed(files)
            files.meta.unlink(missing_ok=True)
            brand_new = brand_new_on(copies, self.me)
            resume = committed is not None and not brand_new and files.device_state.exists() and files.ram.exists()
            if warm is not None and not (resume and warm.fits(spec, committed[0] if committed else None)):
                await warm.close()  # before the taps and sockets below are made again
                warm = None
            for i, disk in enumerate(spec.disks):
                image = LocalImage(str(files.disks[i]), "raw")
                if not os.path.exists(image.path):
                    if not brand_new:
                        raise StorageDaemonError(f"this host's copy {image.path} is missing")
                    if disk.path:  # a disk imported from an image (a boot disk): the pre-copy sends it all
                        await asyncio.to_thread(self.disks.import_into, disk, image)
                    else:
                        ensure_image(image, disk.size)
            if not resume:
                files.ram.unlink(missing_ok=True)  # a cold boot starts from fresh RAM
            make_guest_ram_dir(files.ram)
            paths.run_dir.mkdir(parents=True, exist_ok=True)
            l3 = self.new_l3(spec.name, token, spec, paths, files)
            if warm is not None:
                l3.use_relays(warm.relays, self.cfg.bridge)
            else:
                await l3.open_relays(self.cfg.bridge)
        except BaseException:
            if warm is not None:
                await warm.close()
            raise
        return l3, Checkpointed(str(files.ram), incoming=resume), l3_disk_nodes(files), warm

    async def launch_warm(self, spec: VmSpec, session: str) -> WarmQemu:
        """A QEMU waiting on this host's replica of `spec`, for a takeover or switchover to
        resume in (agent/warm.py): its relays listen, its taps are on the bridge but not
        opened, it was started as `_prepare_l3` + `start` would start it."""
        spec = self._resolved(spec)
        files = self.disks.l3_files(spec)
        for path in files.disks:
            if not path.exists():
                raise QemuError(f"this host's copy {path} is missing")
        paths = VmPaths(self.cfg.state_dir / "vms" / spec.name)
        make_guest_ram_dir(files.ram)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        taps = tap_names(spec)
        relays: list[OutputCommitRelay] = []
        try:
            for i in range(len(spec.nics)):
                relay = OutputCommitRelay(paths.nic_socket(i), -1, gated=False)
                relays.append(relay)
                await relay.start()
            for tap in taps:  # (`ip` runs in a thread: the agent's loop must not stall, see l3/stalls.py)
                await asyncio.to_thread(ensure_tap, tap, self.cfg.bridge)
            qemu = await self.procs.launch(spec, paths, blockdevs=l3_disk_nodes(files), paused=True,
                                           checkpointed=Checkpointed(str(files.ram), incoming=True))
            try:
                await prepare_incoming(qemu)
            except BaseException:
                qemu.kill()
                await qemu.wait()
                raise
        except BaseException:
            for relay in relays:
                await relay.close()
            for tap in taps:
                await asyncio.to_thread(remove_tap, tap)
            raise
        return WarmQemu(spec.name, session, machine_of(spec), qemu, relays, taps)

    def _resolved(self, spec: VmSpec) -> VmSpec:
        return resolved_spec(spec, self.cfg.shared_storage, self.cfg.image_roots + (
            (str(self.cfg.local_storage),) if self.cfg.local_storage else ()))  # level 0: lowered from 2

    async def _outdate_other_copies(self, vm: str, token: int, copies: Copies | None) -> Copies | None:
        """Before this host's QEMU runs the guest, no other copy may still be recorded current.
        Level 3: a partner would otherwise take over from a checkpoint older than what this
        start will make visible. Level 2: the guest writes to this copy alone until the
        partner is resynced, and a partner recorded current would be a stale copy that a
        failover could promote (a claim outdates the others itself; a restart under the
        same token, after a crash, did not). Fails if the partner took over meanwhile."""
        if copies is None:
            return None

        def outdate_others(seen: Copies) -> Copies | None:
            others = [h for h, c in seen.copies.items() if h != self.me and c.state is CopyState.CURRENT]
            new = seen
            for h in others:
                new = mark(new, h, CopyState.OUTDATED, f"VM (re)started on {self.me}", time.time(), full=True)
            return new if others else None
        try:
            return await self.store.update_copies(vm, token, outdate_others)
        except OwnershipLost as e:
            raise StorageDaemonError(f"ownership lost before the start (the partner took over?): {e}") from None
        except EtcdError as e:  # (no start without the record: tried again after the back-off)
            raise StorageDaemonError(f"cannot record the other copies outdated before the start: {e}") from None
