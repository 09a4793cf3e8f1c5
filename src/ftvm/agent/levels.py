"""Online protection level changes of a running VM, on its owner (no guest restart).

Raise to level 2 (from 0 or 1): each disk is copied to this host's local storage by a
mirror job in write-blocking mode while the guest runs (a guest write completes only
once the image and the new local copy both have it, so the copy converges under any
load). Once every disk is in sync: stop the guest, end the jobs (the copies are now
identical), commit in ONE etcd transaction the new spec and the copies record (this
host's copy current; the partner's outdated, to be built in full), point `disk<i>` at
the local copy, hand the disks to a `ReplicaManager` (dirty bitmap first, then `cont`).
The partner's copy is then built while the guest runs; *Protected* only when in sync.

Lower from level 2 (to 0 or 1): the replica manager stops (a resync under way is
cancelled); to level 1 each disk is first mirrored to its shared-storage image, as
above. Then, guest stopped: the partner's copy is dropped from the block graph, the
spec (level 0: the disks are this host's local copies; level 1: the shared images) is
committed with the copies record deleted, `disk<i>` points at the shared image (level
1), `cont`. The partner stops serving its copy when it sees the new spec.

Before the commit any failure cancels the change (jobs cancelled, new nodes removed,
guest continued at the old level). The commit compares the owner's fencing token and
the spec's revision; it is retried on a spec changed meanwhile (e.g. an SLA update);
if ownership is lost, the caller kills QEMU (never two copies).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.model import DiskSpec, Level, LevelChange, VmSpec
from ..core.placement import choose_partner
from ..core.replication import NEW_REPLICA, Copies, Copy, CopyState
from ..qemu.blockgraph import (COPY_AIO, DiskGraph, LocalImage, Mode, drop_child, file_image_node, image_node_name,
                               top_node)
from ..qemu.cmdline import checkpointed_disk_nodes
from ..l3.standby import make_guest_ram_dir
from .paths import under
from ..qemu.migrate import wait_migration
from ..qemu.process import QemuError, QemuVm, set_migration_tls
from ..store.etcd import EtcdError
from ..qemu.storage_daemon import ensure_image
from ..store.pool import OwnershipLost
from .context import VmContext
from .l3 import L3Primary
from .replica import ReplicaManager, replicate

log = logging.getLogger("ftvm.agent.levels")

RAISED = "level raised online"
PROGRESS_EVERY_S = 0.5
READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LevelContext(VmContext):
    """What the change needs from the agent: the VM's context (who, under which token),
    its QEMU, and how this host makes copies (the replica is `replica.replicate`)."""

    qemu: QemuVm
    local_image: Callable[[VmSpec, int], LocalImage]
    writable: Callable[[LocalImage], LocalImage]  # storage_daemon.writable_copy with the host's choice
    shared_storage: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunningDisk:
    """Where a running disk lives now: its image file and the node `disk<i>` points at."""

    path: str
    format: str
    node: str


def running_disks(spec: VmSpec) -> list[RunningDisk]:
    """Levels 0/1: the spec's images, under the nodes `image_nodes` made."""
    return [RunningDisk(d.path, d.format, image_node_name(i)) for i, d in enumerate(spec.disks)]


class DiskMove:
    """The template every online level change follows for its disks, as one context:

        async with DiskMove(ctx, change) as move:
            await move.add(i, path, fmt, size) / move.keep()   # per disk: a new image, or none
            await move.copy()      # write-blocking mirrors, until every disk is in sync
            await move.stop()      # guest stopped; the mirrors end with the disks identical
            await _commit(...)     # the new spec (and copies record) in one etcd transaction
            move.committed()
        await move.switch(old_nodes)  # `disk<i>` on its new image; `cont`

    The raise to level 3 hands the copies to a new QEMU instead (`hand_over_targets` once a
    migration paused the guest; no `switch`).

    Any exception before `committed()` undoes the move: copy jobs cancelled, new nodes
    removed, the `undo` steps the caller registered (newest first), the guest continued if
    it was stopped. OwnershipLost undoes nothing: the caller kills this copy."""

    def __init__(self, ctx: LevelContext, change: LevelChange) -> None:
        self.ctx, self.change = ctx, change
        self.targets: list[str | None] = []
        self.stopped = False
        self._committed = False
        self._undo: list[Callable[[BaseException], Awaitable[None]]] = []

    async def __aenter__(self) -> DiskMove:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: Any) -> bool:
        if e is None or self._committed or isinstance(e, OwnershipLost):
            return False
        await _cancel(self.ctx.qemu, self.targets)
        for undo in reversed(self._undo):
            await undo(e)
        if self.stopped:
            await self.ctx.qemu.execute("cont")
        return False

    def undo(self, step: Callable[[BaseException], Awaitable[None]]) -> None:
        """Also do `step` if the move fails (after the jobs are cancelled, before `cont`)."""
        self._undo.append(step)

    async def add(self, index: int, path: str, fmt: str, size: int, write_through: bool = False,
                  local_copy: bool = False) -> None:
        self.targets.append(await _add_target(self.ctx.qemu, index, path, fmt, size, write_through, local_copy))

    def keep(self) -> None:
        """This disk is already where it goes."""
        self.targets.append(None)

    async def copy(self) -> None:
        await _mirror(self.ctx, self.change, self.targets)

    async def stop(self) -> None:
        await self.ctx.qemu.execute("stop")
        self.stopped = True
        await _end_jobs(self.ctx.qemu, self.targets)

    async def hand_over_targets(self) -> None:
        """Guest paused (not by `stop`): end the copies, identical now, and close their new
        images here, for another QEMU to open (the raise to level 3)."""
        await _end_jobs(self.ctx.qemu, self.targets)
        for node in self.targets:
            if node is not None:
                await self.ctx.qemu.execute("blockdev-del", {"node-name": node})

    def committed(self) -> None:
        """The change is in the store: from here on it is carried through, never undone."""
        self._committed = True

    async def switch(self, old_nodes: list[str | None], resume: bool = True) -> None:
        await _point_at(self.ctx.qemu, self.targets, old_nodes)
        if resume:
            await self.ctx.qemu.execute("cont")


async def raise_to_component(ctx: LevelContext, spec: VmSpec, change: LevelChange,
                             current: list[RunningDisk] | None = None) -> ReplicaManager:
    """Level 0/1 (or 3, checkpointing already ended) -> 2. Returns the running replica manager."""
    current = current or running_disks(spec)
    snap = ctx.snapshot()
    partner = choose_partner(snap, replace(spec, level=Level.COMPONENT), ctx.me) if snap else None
    if partner is None:
        raise RuntimeError("no partner host is up to keep the copy")
    sizes = [await ctx.qemu.disk_size(i) for i in range(len(spec.disks))]
    images = [ctx.local_image(spec, i) for i in range(len(spec.disks))]
    async with DiskMove(ctx, change) as move:
        for i, (disk, image) in enumerate(zip(current, images, strict=True)):
            if disk.path and os.path.exists(image.path) and os.path.samefile(disk.path, image.path):
                if disk.format != image.format:
                    raise RuntimeError(f"{image.path} is {disk.format}, this host keeps {image.format} copies")
                move.keep()  # already this host's local copy (lowered to 0, or level 3 on raw)
                images[i] = ctx.writable(image)  # for the nodes made from now on
                continue
            with suppress(FileNotFoundError):
                os.unlink(image.path)  # whatever an earlier life left there is not this disk
            ensure_image(image, sizes[i])  # the attribute is set on the file, so it must exist first
            image = images[i] = ctx.writable(image)
            await move.add(i, image.path, image.format, sizes[i], image.write_through, local_copy=True)
        await move.copy()
        await move.stop()
        now = time.time()
        copies = Copies(1, {ctx.me: Copy(CopyState.CURRENT, now, RAISED),
                            partner: Copy(CopyState.OUTDATED, now, NEW_REPLICA, full=True)})
        disks = tuple(replace(d, size=sizes[i]) for i, d in enumerate(spec.disks))
        await _commit(ctx, lambda s: replace(s, level=Level.COMPONENT, disks=disks),
                      copies)
        move.committed()
    # committed: the guest must never write to the old image again
    await move.switch([d.node for d in current], resume=False)
    graphs = [DiskGraph(i, Mode.LOCAL_ONLY, 1, target or current[i].node, None, None)
              for i, target in enumerate(move.targets)]
    replica = await replicate(ctx, ctx.qemu, images, graphs)  # bitmap, then cont
    ctx.event("level", f"level {int(spec.level)} -> 2 while running: disks on {ctx.me}'s local "
                       f"storage, partner {partner} syncing in full (Protected when in sync)")
    return replica


async def lower_from_component(ctx: LevelContext, spec: VmSpec, change: LevelChange,
                               replica: ReplicaManager) -> None:
    """Level 2 -> 0 (disks stay this host's local copies) or -> 1 (moved to shared images)."""
    graphs = await replica.release()

    async def replicate_again(e: BaseException) -> None:
        replica.restart()

    async def partner_behind(e: BaseException) -> None:
        # still level 2 in the store, but the partner may have been dropped from the graph:
        # its copy is recorded outdated (full resync) before the guest writes again
        if any(g.mode is not Mode.MIRRORED for g in graphs):
            await replica.partner_outdated(f"lowering the level failed midway: {e}")

    async with DiskMove(ctx, change) as move:
        move.undo(replicate_again)
        if change.level == 1:
            for i, path in enumerate(_shared_targets(ctx, spec, change)):
                fmt = spec.disks[i].format if spec.disks[i].path == path else "raw"
                await move.add(i, path, fmt, await ctx.qemu.disk_size(i))
            await move.copy()
        await move.stop()
        move.undo(partner_behind)
        await _drop_partner(ctx.qemu, replica, graphs)
        if change.level == 1:
            disks = tuple(DiskSpec(path=p, format=spec.disks[i].format if spec.disks[i].path == p else "raw",
                                   size=spec.disks[i].size) for i, p in enumerate(change.disk_paths))
        else:
            disks = tuple(DiskSpec(path=img.path, format=img.format, size=spec.disks[i].size)
                          for i, img in enumerate(replica.images))
        await _commit(ctx, lambda s: replace(s, level=Level(change.level), disks=disks), None)
        move.committed()
    await move.switch([g.local for g in graphs])
    where = "shared images " + ", ".join(change.disk_paths) if change.level == 1 else f"{ctx.me}'s local copy"
    ctx.event("level", f"level 2 -> {change.level} while running: replica released, disks on {where}")


async def lower_from_system(ctx: LevelContext, spec: VmSpec, change: LevelChange,
                            current: list[RunningDisk]) -> ReplicaManager | None:
    """Level 3 -> 2, 1 or 0, checkpointing already ended (the partner's copy recorded
    outdated, output flowing unprotected). The guest's RAM stays in its file and its NICs
    behind the relay (now a plain pass-through) until the next restart."""
    if change.level == 2:
        return await raise_to_component(ctx, spec, change, current)
    sizes = [await ctx.qemu.disk_size(i) for i in range(len(spec.disks))]
    async with DiskMove(ctx, change) as move:
        if change.level == 1:
            for i, path in enumerate(_shared_targets(ctx, spec, change)):
                await move.add(i, path, "raw", sizes[i])
            await move.copy()
        await move.stop()
        paths = change.disk_paths if change.level == 1 else tuple(d.path for d in current)
        disks = tuple(DiskSpec(path=p, format="raw", size=sizes[i]) for i, p in enumerate(paths))
        await _commit(ctx, lambda s: replace(s, level=Level(change.level), disks=disks),
                      None)
        move.committed()
    await move.switch([d.node for d in current])
    where = "shared images " + ", ".join(change.disk_paths) if change.level == 1 else f"{ctx.me}'s local copy"
    ctx.event("level", f"level 3 -> {change.level} while running: checkpointing ended, disks on {where}")
    return None


def _shared_targets(ctx: LevelContext, spec: VmSpec, change: LevelChange) -> tuple[str, ...]:
    """Lowering to level 1: the images the disks move to, checked on this host (the request
    was checked where it was made): on shared storage once resolved, and not replacing an
    existing image unless the operator said so."""
    paths = tuple(under(p, ctx.shared_storage) for p in change.disk_paths)
    own = {d.path for d in spec.disks}
    clobbered = [p for p in paths if os.path.exists(p) and p not in own]
    if clobbered and not change.overwrite:
        raise RuntimeError(f"{', '.join(clobbered)} already exists and overwriting it was not asked")
    return paths


async def _add_target(qemu: QemuVm, index: int, path: str, fmt: str, size: int,
                      write_through: bool = False, local_copy: bool = False) -> str:
    """A node on `path` (created, space reserved, if missing): where disk `index` is copied to.
    `local_copy`: a level 2 copy (written as copies are, COPY_AIO); `write_through`: verified
    write-through (its node skips flushes)."""
    ensure_image(LocalImage(path, fmt), size)
    qemu.give(path)
    name = f"d{index}-lvl{int(time.time() * 1000) % 100000}"
    await qemu.execute("blockdev-add", file_image_node(name, path, fmt, write_through=write_through,
                                                       aio=COPY_AIO if local_copy else "threads"))
    return name


async def _drop_partner(qemu: QemuVm, replica: ReplicaManager, graphs: list[DiskGraph]) -> None:
    """Guest stopped: each mirrored disk goes on alone on this host's copy (`graphs` updated)."""
    for i, g in enumerate(graphs):
        if g.mode is Mode.MIRRORED:
            new, steps = drop_child(g, "remote", replica.images[i], replica.partner_export(i))
            for cmd, args in steps:
                await qemu.execute(cmd, args)
            graphs[i] = new


async def _point_at(qemu: QemuVm, targets: list[str | None], old_nodes: list[str | None]) -> None:
    """Guest stopped, copies identical: `disk<i>` reads and writes its target from now on."""
    for i, target in enumerate(targets):
        if target is None:
            continue
        await qemu.execute("blockdev-reopen", {"options": [top_node(i, target)]})
        if old_nodes[i]:
            with suppress(QemuError):
                await qemu.execute("blockdev-del", {"node-name": old_nodes[i]})


async def _mirror(ctx: LevelContext, change: LevelChange, targets: list[str | None]) -> None:
    """Start a write-blocking mirror of every disk to its target; return once all are ready
    (in sync, and kept in sync by every guest write), reporting progress meanwhile."""
    for i, target in enumerate(targets):
        if target is not None:
            await ctx.qemu.execute("blockdev-mirror", {
                "job-id": f"level-d{i}", "device": f"disk{i}", "target": target, "sync": "full",
                "copy-mode": "write-blocking", "auto-dismiss": True})
    t0 = last = time.monotonic()
    wanted = {f"level-d{i}" for i, t in enumerate(targets) if t is not None}
    while wanted:
        jobs = {j["device"]: j for j in await ctx.qemu.execute("query-block-jobs") if j["device"] in wanted}
        missing = wanted - set(jobs)
        if missing:
            raise RuntimeError(f"copy job {', '.join(sorted(missing))} ended early (I/O error?)")
        if all(j.get("ready") for j in jobs.values()):
            return
        if time.monotonic() - last > PROGRESS_EVERY_S:
            last = time.monotonic()
            done = sum(int(j.get("offset", 0)) for j in jobs.values())
            total = sum(int(j.get("len", 0)) for j in jobs.values())
            with suppress(EtcdError):  # progress figures only
                await ctx.store.update_level_change(ctx.vm, ctx.token, replace(change, phase="copying", done=done,
                                                                               total=total), ctx.lease)
        if time.monotonic() - t0 > READY_TIMEOUT_S:
            raise RuntimeError("copying the disks did not converge")
        await asyncio.sleep(0.05)


async def _end_jobs(qemu: QemuVm, targets: list[str | None]) -> None:
    """Guest stopped, mirrors ready: cancelling a ready mirror leaves its target identical."""
    names = {f"level-d{i}" for i, t in enumerate(targets) if t is not None}
    for name in names:
        await qemu.execute("block-job-cancel", {"device": name})
    for _ in range(1000):
        if not any(j["device"] in names for j in await qemu.execute("query-block-jobs")):
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the copy jobs did not end")


async def _cancel(qemu: QemuVm, targets: list[str | None]) -> None:
    for i, target in enumerate(targets):
        if target is None:
            continue
        with suppress(QemuError):
            await qemu.execute("block-job-cancel", {"device": f"level-d{i}", "force": True})
    for _ in range(200):
        try:
            if not any(j["device"].startswith("level-d") for j in await qemu.execute("query-block-jobs")):
                break
        except QemuError:
            break
        await asyncio.sleep(0.01)
    for target in targets:
        if target is not None:
            with suppress(QemuError):
                await qemu.execute("blockdev-del", {"node-name": target})


async def _commit(ctx: LevelContext, change_spec: Callable[[VmSpec], VmSpec], copies: Copies | None) -> None:
    while True:
        got = await ctx.store.spec(ctx.vm)
        if got is None:
            raise OwnershipLost("the VM was removed")
        spec, rev = got
        if await ctx.store.commit_level_change(ctx.vm, ctx.token, change_spec(spec), rev, copies):
            return
        snap = await ctx.store.snapshot()
        view = snap.vms.get(ctx.vm)
        if view is None or view.owner is None or view.owner.token != ctx.token:
            raise OwnershipLost("this host no longer owns the VM")



async def end_replication(replica: ReplicaManager, why: str) -> list[RunningDisk]:
    """Level 2, before becoming level 3: stop replicating (the partner's copy recorded
    outdated before the guest writes on one copy) and say where the disks run now. On a
    later failure the caller restarts the replica manager (a full resync follows)."""
    graphs = await replica.release()
    qemu = replica.qemu
    if any(g.mode is Mode.MIRRORED for g in graphs):
        await qemu.execute("stop")
        try:
            await _drop_partner(qemu, replica, graphs)
            await replica.partner_outdated(why)
        finally:
            await qemu.execute("cont")
    else:
        await replica.partner_outdated(why)
    return [RunningDisk(img.path, img.format, g.local or "") for img, g in zip(replica.images, graphs, strict=True)]


# --- raise to level 3: a live migration into a new QEMU on this host ------------------------

@dataclass
class SystemTarget:
    """What raising to level 3 needs from the agent: where the files go, how to start the
    new QEMU (RAM in a shared file, NICs through the relays), the checkpointing runtime."""

    files: Any                     # l3.standby.ReplicaPaths: this host's level 3 files
    run_dir: Path                  # the new QEMU's runtime directory
    start_qemu: Callable[[VmSpec, list[list[dict[str, Any]]]], Awaitable[QemuVm]]
    make_l3: Callable[[VmSpec], L3Primary]
    bridge: str
    stopped_copy: bool = False     # copy the RAM with the guest stopped (migration.STOPPED_COPY_WHY)


async def raise_to_system(ctx: LevelContext, spec: VmSpec, change: LevelChange, current: list[RunningDisk],
                          target: SystemTarget) -> tuple[QemuVm, L3Primary]:
    """Level 0/1 (2: replication already released) -> 3 without a guest restart. A level 3
    guest needs its RAM in a shared file and its NICs behind the output-commit relay, which
    a running QEMU cannot change: so the disks are mirrored (write-blocking) to raw files at
    this host's level 3 paths, a new QEMU with the level 3 configuration waits for the VM
    (`-incoming`, late block activation), and the VM migrates into it over a Unix socket.
    The source stops before the switchover (`pause-before-switchover`) so the mirrors end
    with the disks identical; then the device state follows, the spec and copies record
    (this host current, the partner outdated: a full pre-copy) are committed, and the
    caller kills the old QEMU, hands the taps to the relays and runs the new one.
    Returns the new (paused) QEMU and its checkpointing runtime (not begun)."""
    snap = ctx.snapshot()
    disks = tuple([DiskSpec(size=await ctx.qemu.disk_size(i)) for i in range(len(spec.disks))])
    new_spec = replace(spec, level=Level.SYSTEM, disks=disks)
    partner = choose_partner(snap, new_spec, ctx.me) if snap else None
    if partner is None:
        raise RuntimeError("no partner host is up to keep the checkpoints")
    new_qemu: QemuVm | None = None
    l3: L3Primary | None = None
    source_migrating = False

    async def stay_in_the_old_qemu(e: BaseException) -> None:  # the guest goes on there, at the old level
        with suppress(QemuError):
            if source_migrating:
                await ctx.qemu.execute("migrate_cancel")
            await ctx.qemu.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "pause-before-switchover", "state": False}]})
            if (await ctx.qemu.execute("query-status"))["status"] != "running":
                await ctx.qemu.execute("cont")
    try:
        async with DiskMove(ctx, change) as move:
            for i, disk in enumerate(current):
                path = str(target.files.disks[i])
                if disk.format == "raw" and os.path.exists(path) and os.path.samefile(disk.path, path):
                    move.keep()  # already there (level 2 on a raw host): a shared-storage move
                    continue
                with suppress(FileNotFoundError):
                    os.unlink(path)
                await move.add(i, path, "raw", disks[i].size)
            await move.copy()
            target.run_dir.mkdir(parents=True, exist_ok=True)
            make_guest_ram_dir(Path(target.files.ram))
            Path(target.files.ram).unlink(missing_ok=True)
            l3 = target.make_l3(new_spec)
            await l3.open_relays(target.bridge, attach=False)
            new_qemu = await target.start_qemu(new_spec, [checkpointed_disk_nodes(i, str(p))
                                                          for i, p in enumerate(target.files.disks)])
            sock = target.run_dir / "migrate.sock"
            sock.unlink(missing_ok=True)
            await new_qemu.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "late-block-activate", "state": True}]})
            await set_migration_tls(new_qemu, "")  # local: no TLS
            await new_qemu.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            move.undo(stay_in_the_old_qemu)
            await ctx.qemu.execute("migrate-set-capabilities", {"capabilities": [  # (a VM lowered from level 3
                {"capability": "pause-before-switchover", "state": True},        # has its RAM in a shared file:
                {"capability": "x-ignore-shared", "state": False}]})              # it must travel too)
            await ctx.qemu.execute("migrate-set-parameters", {"max-bandwidth": 1 << 32, "downtime-limit": 300})
            await set_migration_tls(ctx.qemu, "")
            if target.stopped_copy:
                await ctx.qemu.execute("stop")  # resumed in the new QEMU (or, on failure, here)
            await ctx.qemu.execute("migrate", {"uri": f"unix:{sock}"})
            source_migrating = True
            await _wait_migration(ctx.qemu, ("pre-switchover",))
            await move.hand_over_targets()  # guest paused: the copies end identical; the new QEMU opens them
            await ctx.qemu.execute("migrate-continue", {"state": "pre-switchover"})
            await _wait_migration(ctx.qemu, ("completed",))
            await _wait_migration(new_qemu, ("completed",))
            now = time.time()
            copies = Copies(1, {ctx.me: Copy(CopyState.CURRENT, now, RAISED),
                                partner: Copy(CopyState.OUTDATED, now, NEW_REPLICA, full=True)})
            await _commit(ctx, lambda s: replace(s, level=Level.SYSTEM, disks=disks), copies)
            move.committed()
    except BaseException:  # the new QEMU goes, whatever happened (on OwnershipLost the caller kills the old)
        if new_qemu is not None:
            new_qemu.kill()
            await new_qemu.wait()
        if l3 is not None:
            with suppress(Exception):  # noqa: BLE001 - undoing: the first error is the one to report
                await l3.close()
        raise
    assert new_qemu is not None and l3 is not None  # (committed: both were made)
    ctx.event("level", f"level {int(spec.level)} -> 3 while running: moved live into a checkpointed "
                       f"QEMU on {ctx.me}; partner {partner} gets a full pre-copy (Protected when acked)")
    return new_qemu, l3


async def _wait_migration(qemu: QemuVm, states: tuple[str, ...], timeout: float = 120.0) -> None:
    await wait_migration(qemu, "migration into the level 3 QEMU", states, timeout)
