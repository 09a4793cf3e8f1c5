"""Online level changes on the VM's owner: which transition a request is
(core/transitions.py), the disk moves that make it (agent/levels.py), and, for a raise
to level 3, the switch from the old QEMU to the new checkpointed one. A failure leaves
the VM running as it was; a lost ownership kills this copy (never two copies)."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import suppress

from ..core.decide import Decision
from ..core.model import Level, LevelChange, PoolSnapshot, VmSpec
from ..core.transitions import Transition, transition
from ..qemu.cmdline import Checkpointed, VmPaths
from ..qemu.process import QemuError
from ..store.etcd import EtcdError
from ..store.pool import OwnershipLost
from . import levels
from .config import AgentConfig
from .context import HostContext
from .disks import HostDisks
from .local import LocalRecord
from .processes import Processes
from .starts import NewL3

log = logging.getLogger("ftvm.agent.level_changes")


class LevelChanges:
    def __init__(self, host: HostContext, cfg: AgentConfig, procs: Processes, disks: HostDisks,
                 new_l3: NewL3) -> None:
        self.host, self.cfg, self.procs, self.disks, self.new_l3 = host, cfg, procs, disks, new_l3
        self.store = host.store

    async def change(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Raise or lower a running VM's level as its level_change record asks."""
        view = snapshot.vms[d.vm]
        rec = self.procs.vms.get(d.vm)
        change = view.level_change
        try:
            fresh = (await self.store.snapshot()).vms.get(d.vm)
            if fresh is None or fresh.level_change != change:
                return  # ended (e.g. a failed attempt deleted it) since this tick's snapshot
            if rec is None or rec.qemu is None or change is None or d.token is None:
                return
            await self._make(d.token, view.spec, change, rec)
        except OwnershipLost as e:
            self.host.journal.event(d.vm, "kill", f"level change: {e}; killing this copy")
            if rec is not None and rec.qemu is not None:
                rec.qemu.kill()
        except Exception as e:  # noqa: BLE001 - any failure ends the change; the VM runs on as it was
            log.exception("%s: level change failed", d.vm)
            level = int(view.spec.level)
            self.host.journal.event(d.vm, "level", f"level {level} -> {change.level if change else '?'} "
                                                   f"failed: {e}; the VM runs on at level {level}")
            with suppress(EtcdError):
                await self.store.end_level_change(d.vm)

    async def _make(self, token: int, spec: VmSpec, change: LevelChange, rec: LocalRecord) -> None:
        assert rec.qemu is not None
        qemu, vm = rec.qemu, spec.name
        ctx = levels.LevelContext(self.host, vm, token, qemu, self.disks.image, self.disks.writable,
                                  shared_storage=self.cfg.shared_storage)
        step = transition(spec.level, Level(change.level))
        if step is Transition.RAISE_TO_COMPONENT:
            rec.replica = await levels.raise_to_component(ctx, spec, change)
        elif step is Transition.LOWER_FROM_COMPONENT and rec.replica is not None:
            await levels.lower_from_component(ctx, spec, change, rec.replica)
            if change.level == Level.UNPROTECTED:
                rec.kept_write_through = [img for img in rec.replica.images if img.write_through]
            rec.replica = None
        elif step is Transition.RAISE_TO_SYSTEM:
            await self._raise_to_system(ctx, spec, change, rec)
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

    async def _raise_to_system(self, ctx: levels.LevelContext, spec: VmSpec, change: LevelChange,
                               rec: LocalRecord) -> None:
        """Level 0/1/2 -> 3 while running: the VM moves live into a new QEMU on this host
        (levels.raise_to_system); this is the switch from the old QEMU to it."""
        assert rec.qemu is not None
        vm, token = ctx.vm, ctx.token
        replica = rec.replica
        if spec.level is Level.COMPONENT and replica is not None:
            current = await levels.end_replication(replica, "level 3 asked: the replica is rebuilt by checkpoints")
        else:
            current = levels.running_disks(spec)
        files = self.disks.l3_files(spec)
        run_dir = self.cfg.state_dir / "vms" / vm / "l3"
        paths = VmPaths(run_dir)

        target = levels.SystemTarget(
            files=files, run_dir=run_dir, bridge=self.cfg.bridge, stopped_copy=self.procs.inexact_dirty_tracking,
            start_qemu=lambda new_spec, blockdevs: self.procs.launch(
                new_spec, paths, blockdevs=blockdevs, checkpointed=Checkpointed(str(files.ram)), incoming=True),
            make_l3=lambda new_spec: self.new_l3(vm, token, new_spec, paths, files))
        try:
            new_qemu, l3 = await levels.raise_to_system(ctx, spec, change, current, target)
        except BaseException:
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
        if not self.procs.guard.may_run():
            new_qemu.kill()
            raise OwnershipLost("the host lease ran out during the switch")
        self.procs.adopt(rec, new_qemu)
        l3.attach_taps(self.cfg.bridge)
        await new_qemu.execute("cont")
        rec.l3 = l3
        l3.begin(new_qemu)
        with suppress(QemuError):
            await new_qemu.announce()
        rec.detail = self.procs.describe(new_qemu)
        for sock in ("qmp.sock", "qmp-debug.sock"):  # where tools look for this VM's QEMU
            if (run_dir / sock).exists():
                os.replace(run_dir / sock, run_dir.parent / sock)
