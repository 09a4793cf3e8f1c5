"""Asynchronous DR, the source's end on this host: shipping the recovery points of the VMs
it owns (spec.dr_target), one task per VM, and asking the DR site before a VM with a DR
target is started (Action.DR_CONFIRM). The DR site's end is agent/dr_site.py.

Where points come from: the VM's QEMU (dr/capture.py) on its owner; for a level 3 VM
while it is protected, its partner's replica (dr/standby_capture.py), shipped by the
partner, because a point's backup job on the primary would make its checkpoints fail (the
primary holds `quiet` while it checkpoints).

Shipping, per VM running here with a DR target: every `dr_interval_s(rpo)` a point is taken
on its QEMU and sent (dr/sender.py); the figures go to the store under the owner's token
(`vms/<vm>/dr`), and events say when points start failing or work again, and when the lag
passes the RPO or comes back under it. The receivers of the target are tried in order.
Each delivered point is the DR site's word that it has not taken the VM over: it renews
`vms/<vm>/dr-confirmed` (every third of dr_confirm), which lets the VM be restarted here
after a host's loss without asking. A DR site that answers "failed over" has the VM
stopped here for good (spec.dr_failed_over).

A point takes a fleecing node and a backup job on the disks' top nodes: a live migration or
level change (which rework the block graph) waits for the point in flight and takes no new
one until it is done (`quiet`). The VM's QEMU changes with a move, so the point after one
is a diff (dr/sender.py): incremental shipping resumes from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.decide import Decision
from ..core.model import (DR_SWITCH_LEVEL3, Desired, DrConfirmation, DrFailover, DrFigures, DrTarget, Level,
                          PoolSnapshot, RunState, VmSpec, VmView, dr_interval_s)
from ..dr.capture import Capture, PointCapture
from ..dr.standby_capture import StandbyCapture
from ..l3.standby import Standby
from ..dr.sender import DrError, DrSender, FailedOver, TargetWord, ask_target, receiver_addr
from ..qemu.process import QemuError, QemuVm
from ..qemu.runas import RunAs
from ..store.etcd import EtcdError
from .config import AgentConfig
from .context import HostContext
from .dr_site import DrSite, dr_key
from .l3 import is_partner
from .local import LocalRecord, spawn

log = logging.getLogger("ftvm.agent.dr")
NBD_SOCKET = "bitmaps.sock"   # the QEMU's one NBD server, shared with level 3 (l3/disk_writes.py)
CONFIRM_RETRY_S = 5.0         # a DR site that did not answer is asked again after this
HEARTBEAT_S = 1.0             # between points, the DR site hears from the owner this often


class DrShipping:
    def __init__(self, cfg: AgentConfig, ctx: HostContext, vms: dict[str, LocalRecord], run_as: RunAs | None,
                 standby_of: Callable[[str], Standby | None] = lambda vm: None) -> None:
        """`standby_of`: the level 3 replica this host keeps of a VM, if any (agent/l3.py)."""
        self.cfg, self.ctx, self.vms, self.run_as = cfg, ctx, vms, run_as
        self.site = DrSite(cfg, ctx, run_as)  # (the DR site's end, when this host receives)
        self.standby_of = standby_of
        self.tasks: dict[str, tuple[str, float, str, asyncio.Task[None]]] = {}  # vm -> (target, rpo, source, task)
        self.locks: dict[str, asyncio.Lock] = {}
        self.quieted: dict[str, int] = {}  # vm -> holders of `quiet`
        self.confirming: set[str] = set()
        self.confirm_after: dict[str, float] = {}   # vm -> monotonic: not asked again before
        self.unanswered: set[str] = set()           # VMs whose DR site did not answer (one event)
        self.confirmed_at: dict[str, float] = {}    # vm -> when this host last wrote its confirmation
        self.switching: set[str] = set()            # failbacks being switched over (their last point)

    async def start(self) -> None:
        await self.site.start()

    def sync(self, snapshot: PoolSnapshot) -> None:
        """After each tick: a task for each VM with a DR target whose points come from this
        host (its QEMU where it runs; a level 3 VM's from its replica here while this host is
        its partner); the DR site's work if this host receives."""
        self.site.sync(snapshot)
        me = self.cfg.name
        wanted: dict[str, tuple[str, float, str]] = {}
        for name, rec in self.vms.items():
            view = snapshot.vms.get(name)
            if (view is None or not view.spec.dr_target or view.owner is None or view.owner.host != me
                    or view.owner.token != rec.token or rec.state is not RunState.RUNNING or rec.qemu is None
                    or view.spec.dr_failed_over or name in self.switching):
                continue
            wanted[name] = (view.spec.dr_target, view.spec.dr_rpo_s, QEMU)
        for name, view in snapshot.vms.items():
            if (name in wanted or not view.spec.dr_target or view.spec.level is not Level.SYSTEM
                    or view.owner is None or view.owner.host == me or view.spec.dr_failed_over
                    or not is_partner(snapshot, me, name)):
                continue
            standby = self.standby_of(name)
            if standby is not None and standby.committed is not None and standby.connected:
                wanted[name] = (view.spec.dr_target, view.spec.dr_rpo_s, REPLICA)
        for f in snapshot.dr_failovers.values():  # failbacks whose switchover was asked, of VMs run here
            if (f.switch_at and not f.switched and f.vm in wanted and wanted[f.vm][2] == QEMU
                    and f.failback_target == wanted[f.vm][0]):
                del wanted[f.vm]
                self.switching.add(f.vm)
                spawn(self._switch_back(f, snapshot), name=f"dr-switch-{f.vm}")
        for name in list(self.tasks):
            target, rpo, source, task = self.tasks[name]
            if wanted.get(name) != (target, rpo, source) or task.done():
                task.cancel()
                del self.tasks[name]
        for name, (target, rpo, source) in wanted.items():
            if name not in self.tasks:
                task = asyncio.create_task(self._ship(name, target, rpo, source), name=f"dr-{name}")
                self.tasks[name] = (target, rpo, source, task)

    # --- asking the DR site before a start -------------------------------------------------
    async def confirm(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Action.DR_CONFIRM: ask the VM's DR site whether it has taken it over (in the
        background; the next tick claims the VM once the answer is recorded)."""
        view = snapshot.vms[d.vm]
        if d.vm in self.confirming or time.monotonic() < self.confirm_after.get(d.vm, 0.0):
            return
        self.confirming.add(d.vm)
        spawn(self._confirm(d.vm, view.spec.dr_target, snapshot.dr_targets.get(view.spec.dr_target)),
              name=f"dr-confirm-{d.vm}")

    async def _confirm(self, vm: str, target: str, dr_target: DrTarget | None) -> None:
        try:
            why = ("unknown DR target" if dr_target is None
                   else "this host has no dr_secret_file" if not self.cfg.dr_secret else "")
            word = (TargetWord("", None, (why,)) if why or dr_target is None else
                    await ask_target(dr_target.receivers, dr_key(self.cfg.dr_secret, self.cfg.pool), self.cfg.pool,
                                     vm))
            if word.state is None:
                if vm not in self.unanswered:
                    self.unanswered.add(vm)
                    self.ctx.journal.event(vm, "dr", f"not started: DR target {target} cannot say whether it has "
                                                     f"taken the VM over ({'; '.join(word.errors)}). Asked again "
                                                     f"every {CONFIRM_RETRY_S:g} s; `ftvm dr remove {vm}` drops the "
                                                     "DR target and this wait")
            elif word.state["failed_over"]:
                await self._failed_over(vm, target, f"{word.receiver} says it runs the VM "
                                                    f"(from its point {word.state.get('newest')})")
            else:
                await self.ctx.store.confirm_dr(vm, DrConfirmation(time.time(), target, self.cfg.name))
                self.ctx.journal.event(vm, "dr", f"DR target {target} ({word.receiver}) has not taken the VM over: "
                                                 "it may start here")
                self.unanswered.discard(vm)
                self.ctx.wake()
        except EtcdError as e:
            log.warning("%s: DR confirmation not recorded: %s", vm, e)
        finally:
            self.confirm_after[vm] = time.monotonic() + CONFIRM_RETRY_S
            self.confirming.discard(vm)

    async def _failed_over(self, vm: str, target: str, why: str) -> None:
        """The DR site runs the VM: stopped here, and never started again without a failback."""
        text = f"failed over to DR target {target} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {why}"
        for _ in range(5):
            if await self.ctx.store.mark_dr_failed_over(vm, text):
                break
        self.ctx.journal.event(vm, "dr-failover", f"{text}. Stopped here; `ftvm dr failback {vm}` brings it back")
        self.ctx.wake()

    async def _confirmed(self, vm: str, target: str) -> None:
        """A point was delivered: the DR site has not taken the VM over (recorded every third
        of dr_confirm: a restart here needs a recent one)."""
        now = time.monotonic()
        if now - self.confirmed_at.get(vm, -1e9) < self.ctx.timing.dr_confirm / 3:
            return
        with suppress(EtcdError):
            await self.ctx.store.confirm_dr(vm, DrConfirmation(time.time(), target, self.cfg.name))
            self.confirmed_at[vm] = now

    # --- failback: the switchover, at the DR pool -------------------------------------------
    async def _switch_back(self, f: DrFailover, snapshot: PoolSnapshot) -> None:
        """Pause the guest, ship its last point (the home pool starts the VM from it), stop it."""
        vm = f.vm
        try:
            running = self.tasks.pop(vm, None)
            if running is not None:  # (its point in flight ends first)
                running[3].cancel()
                await asyncio.gather(running[3], return_exceptions=True)
            rec, target = self.vms.get(vm), snapshot.dr_targets.get(f.failback_target)
            view = snapshot.vms.get(vm)
            if rec is None or rec.qemu is None or target is None or view is None:
                raise DrError("the VM or its failback target is gone")
            if view.spec.level is Level.SYSTEM:
                raise DrError(DR_SWITCH_LEVEL3)
            qemu = rec.qemu
            async with self.locks.setdefault(vm, asyncio.Lock()):
                await qemu.execute("stop")  # nothing the guest writes from here is lost
                sender = self._sender(vm, await self._qemu_capture(qemu, view.spec), target.receivers[0],
                                      view.spec.to_json())
                try:
                    shipped = await sender.ship(final=True)
                except BaseException:
                    with suppress(QemuError):
                        await qemu.execute("cont")
                    raise
                finally:
                    sender.close()
                    with suppress(QemuError, OSError, asyncio.TimeoutError):
                        await asyncio.wait_for(sender.capture.stop(), 5)
            await self.ctx.store.update_dr_failover(replace(f, switched=True))
            for _ in range(5):
                got = await self.ctx.store.spec(vm)
                if got is None or await self.ctx.store.update_spec(
                        replace(got[0], desired=Desired.STOPPED, stop_force=True, dr_target="", dr_rpo_s=0.0),
                        got[1]):
                    break
            self.ctx.journal.event(vm, "dr-failback", f"switchover: paused, its last point ({shipped.number}, "
                                                      f"{shipped.data_bytes} bytes) delivered to {f.failback_target};"
                                                      " stopped here, its home pool starts it")
            self.ctx.wake()
        except (DrError, QemuError, OSError, EtcdError) as e:
            self.ctx.journal.event(vm, "error", f"failback switchover failed, the VM runs on here: {e}")
            with suppress(EtcdError):
                await self.ctx.store.update_dr_failover(replace(f, switch_at=0.0))
        finally:
            self.switching.discard(vm)

    # --- shipping ----------------------------------------------------------------------------
    @asynccontextmanager
    async def quiet(self, vm: str) -> AsyncIterator[None]:
        """No DR point on `vm`'s QEMU while this lasts (a migration, a level change, a level
        3 checkpointing session): the one in flight ends first. Held by several at once (a
        level 3 VM migrates while it checkpoints): a count, not a lock."""
        self.quieted[vm] = self.quieted.get(vm, 0) + 1
        try:
            async with self.locks.setdefault(vm, asyncio.Lock()):
                pass  # (a point in flight holds it: it ends first; none starts while counted)
            yield
        finally:
            self.quieted[vm] -= 1
            if not self.quieted[vm]:
                del self.quieted[vm]

    async def close(self) -> None:
        for *_, task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        await self.site.close()

    def _source(self, vm: str, kind: str, view: VmView) -> _Source | None:
        """Where `vm`'s next point comes from now (None: nowhere at the moment)."""
        if kind == QEMU:
            rec = self.vms.get(vm)
            if rec is None or rec.qemu is None or vm in self.quieted:
                return None
            qemu = rec.qemu
            return _Source(qemu, rec.token, lambda: self._qemu_capture(qemu, view.spec), lambda: qemu.alive)
        standby = self.standby_of(vm)
        held = standby.committed if standby is not None else None
        if standby is None or held is None or not standby.connected or view.owner is None:
            return None
        session = held.session
        return _Source((id(standby), session), view.owner.token,
                       lambda: self._replica_capture(standby, session, view.spec), lambda: True)

    async def _ship(self, vm: str, target: str, rpo: float, kind: str) -> None:
        interval = dr_interval_s(rpo)
        figures = DrFigures(target=target, since=time.time(), source=f"{self.cfg.name} ({kind})")
        sender: DrSender | None = None
        src: _Source | None = None
        failing, over = False, None  # (over: unknown until the first look, which goes to the history)
        receiver = 0
        cut_at = time.monotonic()  # the last point's start: the next is cut an interval after it
        try:
            while True:
                if figures.newest or failing:  # (or right after the one before, if it took longer)
                    while (left := cut_at + interval - time.monotonic()) > HEARTBEAT_S:
                        await asyncio.sleep(HEARTBEAT_S)
                        if sender is not None and vm not in self.quieted:
                            await sender.heartbeat()
                    await asyncio.sleep(max(0.1, left))
                else:
                    await asyncio.sleep(0.5)
                snap = self.ctx.latest()
                view = snap.vms.get(vm) if snap else None
                now_src = self._source(vm, kind, view) if view is not None else None
                if view is None or now_src is None:
                    continue
                dr_target = snap.dr_targets.get(target) if snap else None
                if dr_target is None:
                    figures = replace(figures, error=f"unknown DR target {target}")
                    await self._report(vm, now_src.token, figures)
                    continue
                if not self.cfg.dr_secret:
                    figures = replace(figures, error="this host has no dr_secret_file: it cannot ship DR points")
                    await self._report(vm, now_src.token, figures)
                    continue
                async with self.locks.setdefault(vm, asyncio.Lock()):
                    if kind == QEMU and vm in self.quieted:
                        continue
                    try:
                        if sender is None or src is None or src.key != now_src.key:
                            if sender is not None:
                                await self._end(sender, src)
                                sender = None
                            src = now_src
                            sender = self._sender(vm, await src.capture(), dr_target.receivers[0],
                                                  view.spec.to_json())
                        cut_at = time.monotonic()
                        shipped = await sender.ship()
                    except FailedOver as e:
                        await self._failed_over(vm, target, str(e))
                        return
                    except (DrError, QemuError, OSError) as e:
                        figures = replace(figures, error=str(e))
                        if not failing:
                            self.ctx.journal.event(vm, "dr", f"DR point to {target} failed: {e}; retried every "
                                                              f"{interval:g} s")
                        failing = True
                        receiver += 1  # the next receiver of the target next time
                        if sender is not None:
                            sender.addr = receiver_addr(dr_target.receivers[receiver % len(dr_target.receivers)])
                    else:
                        if failing:
                            self.ctx.journal.event(vm, "dr", f"DR points to {target} go again (point "
                                                              f"{shipped.number}, {shipped.kind})")
                        failing = False
                        await self._confirmed(vm, target)
                        figures = replace(figures, receiver=f"{sender.addr[0]}:{sender.addr[1]}",
                                          newest=shipped.number, newest_taken_at=shipped.taken_at,
                                          kind=shipped.kind, data_bytes=shipped.data_bytes,
                                          wire_bytes=shipped.wire_bytes, seconds=round(shipped.seconds, 3),
                                          error="", sent_bytes=figures.sent_bytes + shipped.wire_bytes,
                                          written_bytes=figures.written_bytes + shipped.data_bytes)
                lag = time.time() - (figures.newest_taken_at or figures.since)
                if lag > rpo and over is not True:
                    self.ctx.journal.event(vm, "dr-lag", f"DR lag {lag:.0f} s is over the RPO ({rpo:g} s)")
                    self.ctx.journal.history(vm, "dr-over", f"lag {lag:.0f} s, RPO {rpo:g} s")
                    over = True
                elif lag <= rpo and over is not False:
                    if over:
                        self.ctx.journal.event(vm, "dr-lag", f"DR lag back to {lag:.0f} s, within the RPO ({rpo:g} s)")
                    self.ctx.journal.history(vm, "dr-back", f"lag {lag:.0f} s, RPO {rpo:g} s")
                    over = False
                await self._report(vm, now_src.token, figures)
        finally:
            if sender is not None:
                await self._end(sender, src)

    @staticmethod
    async def _end(sender: DrSender, src: _Source | None) -> None:
        """Close a sender's session and its capture (a QEMU that is gone needs no clean-up)."""
        sender.close()
        if src is not None and src.alive():
            with suppress(QemuError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(sender.capture.stop(), 5)

    def _sender(self, vm: str, capture: Capture, receiver: str, spec: dict[str, Any]) -> DrSender:
        return DrSender(capture, vm, self.cfg.pool, dr_key(self.cfg.dr_secret, self.cfg.pool), receiver_addr(receiver),
                        spec, self.ctx.timing.dr_confirm)

    async def _qemu_capture(self, qemu: QemuVm, spec: VmSpec) -> PointCapture:
        run_dir = qemu.paths.run_dir
        # the disks' top nodes are named disk<i> at every level (qemu/blockgraph.py)
        nodes = [f"disk{i}" for i in range(len(spec.disks))]
        own = self.run_as.own if self.run_as is not None else (lambda p: None)
        capture = PointCapture(qemu, nodes, run_dir, run_dir / NBD_SOCKET, own=lambda p: own(Path(p)))
        await capture.start()
        return capture

    async def _replica_capture(self, standby: Standby, session: str, spec: VmSpec) -> StandbyCapture:
        capture = StandbyCapture(standby, session, tuple(d.size for d in spec.disks),
                                 self.cfg.state_dir / "dr-keep" / spec.name)
        await capture.start()
        return capture

    async def _report(self, vm: str, token: int, figures: DrFigures) -> None:
        with suppress(EtcdError):
            await self.ctx.store.report_dr(vm, token, figures, self.ctx.lease)


QEMU, REPLICA = "qemu", "partner's replica"  # where a VM's points are cut


@dataclass(frozen=True)
class _Source:
    key: object                                  # another key: a new capture (another QEMU, session)
    token: int                                   # the ownership the figures are written under
    capture: Callable[[], Awaitable[Capture]]
    alive: Callable[[], bool]                    # whether its capture can still be cleaned up
