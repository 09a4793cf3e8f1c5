"""Asynchronous DR on this host: receiving other pools' recovery points (host.toml dr_listen)
and shipping those of the VMs it owns (spec.dr_target), one task per VM.

Shipping, per VM running here with a DR target: every `dr_interval_s(rpo)` a point is taken
on its QEMU and sent (dr/sender.py); the figures go to the store under the owner's token
(`vms/<vm>/dr`), and events say when points start failing or work again, and when the lag
passes the RPO or comes back under it. The receivers of the target are tried in order.

A point takes a fleecing node and a backup job on the disks' top nodes: a live migration or
level change (which rework the block graph) waits for the point in flight and takes no new
one until it is done (`quiet`). The VM's QEMU changes with a move, so the point after one
is a diff (dr/sender.py): incremental shipping resumes from there.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.model import (Desired, DiskSpec, DrFigures, DrPoint, DrReplica, DrTest, Level, PoolSnapshot, RunState,
                          VmSpec, dr_interval_s)
from ..core.records import RecordError
from ..dr.capture import PointCapture
from ..dr.journal import JournalError, Replica
from ..dr.receiver import Committed, Receiver
from ..dr.sender import DrError, DrSender
from ..qemu.process import QemuError, QemuVm
from ..qemu.runas import RunAs
from ..secret import derive
from ..store.etcd import EtcdError
from .config import AgentConfig
from .context import HostContext
from .local import LocalRecord, spawn

log = logging.getLogger("ftvm.agent.dr")
NBD_SOCKET = "bitmaps.sock"   # the QEMU's one NBD server, shared with level 3 (l3/disk_writes.py)
PUBLISH_EVERY_S = 5.0


def dr_key(secret: bytes, source_pool: str) -> bytes:
    """The key of one source pool's DR sessions (both pools hold the DR secret)."""
    return derive(secret, f"dr {source_pool}")


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class DrShipping:
    def __init__(self, cfg: AgentConfig, ctx: HostContext, vms: dict[str, LocalRecord], run_as: RunAs | None) -> None:
        self.cfg, self.ctx, self.vms, self.run_as = cfg, ctx, vms, run_as
        self.tasks: dict[str, tuple[str, float, asyncio.Task[None]]] = {}  # vm -> (target, rpo, task)
        self.locks: dict[str, asyncio.Lock] = {}
        self.quieted: set[str] = set()
        self.receiver: Receiver | None = None
        self.published_lease = 0  # the lease the replica records were last published under
        self.unpublished: set[tuple[str, str]] = set()       # (pool, vm) with points not yet in the store
        self.testing: set[tuple[str, str]] = set()  # test copies being made
        self.tested: set[tuple[str, str]] = set()   # tests whose point was marked tested
        self.ending: set[str] = set()               # test copies being removed
        self.published_at: dict[tuple[str, str], float] = {}  # monotonic

    # --- receiving ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.dr_listen is None:
            return
        assert self.cfg.local_storage is not None  # (config: dr_listen needs it)
        secret = self.cfg.dr_secret
        self.receiver = Receiver(self.cfg.local_storage / "dr", lambda pool: dr_key(secret, pool), self._committed)
        addr, port = self.cfg.dr_listen
        try:
            await self.receiver.serve(addr, port)
        except OSError as e:
            self.ctx.journal.event("", "error", f"cannot receive DR points on {addr}:{port}: {e}")
            self.receiver = None
            return
        await self._publish_all()

    def _committed(self, c: Committed) -> None:
        log.info("DR point %d of %s/%s committed (%d bytes)", c.number, c.pool, c.vm, c.stored_bytes)
        self.unpublished.add((c.pool, c.vm))
        self._publish_due()

    def _publish_due(self) -> None:
        """Replica records written at most every PUBLISH_EVERY_S each (a point may come every
        second; the record lists them all)."""
        now = time.monotonic()
        for key in list(self.unpublished):
            if now - self.published_at.get(key, -PUBLISH_EVERY_S) >= PUBLISH_EVERY_S:
                self.unpublished.discard(key)
                self.published_at[key] = now
                spawn(self._publish(*key), name=f"dr-publish-{key[0]}-{key[1]}")

    def _replica_dir(self, pool: str, vm: str) -> Path:
        assert self.cfg.local_storage is not None
        return self.cfg.local_storage / "dr" / pool / vm

    async def _publish(self, pool: str, vm: str) -> None:
        """Tell this pool which points of `pool`'s VM this host keeps (`ftvm dr points`)."""
        def summary() -> DrReplica:
            rep = Replica(self._replica_dir(pool, vm))
            tested = rep.tested()
            points = tuple(DrPoint(n, rep.header(n).taken_at, n in tested) for n in rep.numbers())
            return DrReplica(pool, vm, self.cfg.name, points, rep.sizes, time.time())
        try:
            replica = await asyncio.to_thread(summary)
            await self.ctx.store.publish_dr_replica(replica, self.ctx.lease)
        except (OSError, ValueError, JournalError, EtcdError) as e:
            log.warning("DR replica %s/%s not published: %s", pool, vm, e)

    async def _publish_all(self) -> None:
        """Every replica kept here (at start, and under a new lease: the records live on it)."""
        root = (self.cfg.local_storage / "dr") if self.cfg.local_storage else None
        self.published_lease = self.ctx.lease
        if root is None or not root.is_dir():
            return
        for pool_dir in sorted(root.iterdir()):
            for vm_dir in sorted(pool_dir.iterdir()) if pool_dir.is_dir() else []:
                if (vm_dir / "state.json").exists():
                    await self._publish(pool_dir.name, vm_dir.name)

    # --- test failovers (this host keeps the points) -----------------------------------------
    def _tests_dir(self) -> Path:
        assert self.cfg.local_storage is not None
        return self.cfg.local_storage / "dr-tests"

    def _sync_tests(self, snapshot: PoolSnapshot) -> None:
        """Start the copy of each test asked of a replica kept here; mark its point tested once
        it runs; remove the copy of a test that was ended, once it has stopped."""
        if self.receiver is None:
            return
        for key, test in snapshot.dr_tests.items():
            if test.host != self.cfg.name or key in self.testing:
                continue
            view = snapshot.vms.get(test.test_vm)
            if view is None and key not in self.tested:
                self.testing.add(key)
                spawn(self._start_test(test), name=f"dr-test-{test.vm}")
            elif (view is not None and view.status is not None and view.status.state is RunState.RUNNING
                  and key not in self.tested):
                self.tested.add(key)
                spawn(self._mark_tested(test), name=f"dr-tested-{test.vm}")
        asked = {t.test_vm for t in snapshot.dr_tests.values()}
        for name, view in snapshot.vms.items():
            ours = (view.spec.preferred_host == self.cfg.name and bool(view.spec.disks)
                    and all(d.path.startswith(str(self._tests_dir()) + "/") for d in view.spec.disks))
            if ours and name not in asked and view.owner is None and name not in self.ending:
                self.ending.add(name)
                spawn(self._remove_test(name), name=f"dr-test-end-{name}")
        self.tested &= set(snapshot.dr_tests)

    async def _start_test(self, test: DrTest) -> None:
        """Images of the point, made for the test (the replica is never written), and a level 0
        VM on them, on this host, with every NIC isolated."""
        try:
            rep = Replica(self._replica_dir(test.pool, test.vm))
            spec_json = rep.spec()
            if spec_json is None:
                raise JournalError("the owner never sent the VM's spec (an older ftvm)")
            source = VmSpec.from_json(spec_json)
            dest = self._tests_dir() / test.pool / test.vm
            images = await asyncio.to_thread(rep.materialize, test.point, dest)
            if self.run_as is not None:
                self.run_as.own(*images)
            spec = replace(source, name=test.test_vm, level=Level.UNPROTECTED, desired=Desired.RUNNING,
                           preferred_host=self.cfg.name, site="", dr_target="", dr_rpo_s=0.0, failback=False,
                           disks=tuple(DiskSpec(str(p), "raw") for p in images),
                           nics=tuple(replace(n, isolated=True) for n in source.nics))
            await self.ctx.store.define_vm(spec)
            self.ctx.journal.event(test.test_vm, "dr-test", f"test failover of {test.pool}/{test.vm} from point "
                                                            f"{test.point}: starting on {self.cfg.name}, isolated")
        except (OSError, ValueError, JournalError, RecordError, EtcdError) as e:
            self.ctx.journal.event(test.vm, "error", f"test failover of {test.pool}/{test.vm} failed: {e}")
            with suppress(EtcdError):
                await self.ctx.store.end_dr_test(test.pool, test.vm)
        finally:
            self.testing.discard((test.pool, test.vm))

    async def _mark_tested(self, test: DrTest) -> None:
        await asyncio.to_thread(Replica(self._replica_dir(test.pool, test.vm)).mark_tested, test.point)
        self.ctx.journal.event(test.test_vm, "dr-test", f"point {test.point} of {test.pool}/{test.vm} runs: "
                                                        "marked tested")
        await self._publish(test.pool, test.vm)

    async def _remove_test(self, name: str) -> None:
        try:
            got = await self.ctx.store.spec(name)
            if got is not None and got[0].desired is Desired.STOPPED:
                if await self.ctx.store.remove_vm(name, got[1]):
                    for d in got[0].disks:
                        await asyncio.to_thread(shutil.rmtree, Path(d.path).parent, True)
                    self.ctx.journal.event(name, "dr-test", "test failover ended: its copy and images removed")
        except EtcdError as e:
            log.warning("%s: test copy not removed yet: %s", name, e)
        finally:
            self.ending.discard(name)

    # --- shipping ----------------------------------------------------------------------------
    def sync(self, snapshot: PoolSnapshot) -> None:
        """After each tick: a task for each VM owned and running here with a DR target; test
        failovers of the replicas kept here."""
        if self.receiver is not None and self.published_lease != self.ctx.lease:
            self.published_lease = self.ctx.lease
            spawn(self._publish_all(), name="dr-publish-all")
        self._publish_due()
        self._sync_tests(snapshot)
        wanted: dict[str, tuple[str, float]] = {}
        for name, rec in self.vms.items():
            view = snapshot.vms.get(name)
            if (view is None or not view.spec.dr_target or view.owner is None or view.owner.host != self.cfg.name
                    or view.owner.token != rec.token or rec.state is not RunState.RUNNING or rec.qemu is None):
                continue
            wanted[name] = (view.spec.dr_target, view.spec.dr_rpo_s)
        for name in list(self.tasks):
            target, rpo, task = self.tasks[name]
            if wanted.get(name) != (target, rpo) or task.done():
                task.cancel()
                del self.tasks[name]
        for name, (target, rpo) in wanted.items():
            if name not in self.tasks:
                task = asyncio.create_task(self._ship(name, target, rpo), name=f"dr-{name}")
                self.tasks[name] = (target, rpo, task)

    @asynccontextmanager
    async def quiet(self, vm: str) -> AsyncIterator[None]:
        """No DR point on `vm`'s QEMU while this lasts (a migration, a level change): the one
        in flight ends first."""
        self.quieted.add(vm)
        try:
            async with self.locks.setdefault(vm, asyncio.Lock()):
                yield
        finally:
            self.quieted.discard(vm)

    async def close(self) -> None:
        for _, _, task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        if self.receiver is not None:
            await self.receiver.close()

    async def _ship(self, vm: str, target: str, rpo: float) -> None:
        interval = dr_interval_s(rpo)
        figures = DrFigures(target=target, since=time.time())
        sender: DrSender | None = None
        qemu: QemuVm | None = None
        failing, over = False, False
        receiver = 0
        try:
            while True:
                await asyncio.sleep(interval if figures.newest or failing else 0.5)
                rec = self.vms.get(vm)
                snap = self.ctx.latest()
                view = snap.vms.get(vm) if snap else None
                if rec is None or rec.qemu is None or view is None or vm in self.quieted:
                    continue
                dr_target = snap.dr_targets.get(target) if snap else None
                if dr_target is None:
                    figures = replace(figures, error=f"unknown DR target {target}")
                    await self._report(vm, rec, figures)
                    continue
                if not self.cfg.dr_secret:
                    figures = replace(figures, error="this host has no dr_secret_file: it cannot ship DR points")
                    await self._report(vm, rec, figures)
                    continue
                async with self.locks.setdefault(vm, asyncio.Lock()):
                    if vm in self.quieted:
                        continue
                    try:
                        if sender is None or qemu is not rec.qemu:
                            if sender is not None:
                                sender.close()
                                sender = None
                            qemu = rec.qemu
                            sender = await self._sender(vm, qemu, dr_target.receivers[0], view.spec.to_json())
                        shipped = await sender.ship()
                    except (DrError, QemuError, OSError) as e:
                        figures = replace(figures, error=str(e))
                        if not failing:
                            self.ctx.journal.event(vm, "dr", f"DR point to {target} failed: {e}; retried every "
                                                              f"{interval:g} s")
                        failing = True
                        receiver += 1  # the next receiver of the target next time
                        if sender is not None:
                            sender.addr = _addr(dr_target.receivers[receiver % len(dr_target.receivers)])
                    else:
                        if failing:
                            self.ctx.journal.event(vm, "dr", f"DR points to {target} go again (point "
                                                              f"{shipped.number}, {shipped.kind})")
                        failing = False
                        figures = replace(figures, receiver=f"{sender.addr[0]}:{sender.addr[1]}",
                                          newest=shipped.number, newest_taken_at=shipped.taken_at,
                                          kind=shipped.kind, data_bytes=shipped.data_bytes,
                                          wire_bytes=shipped.wire_bytes, seconds=round(shipped.seconds, 3),
                                          error="", sent_bytes=figures.sent_bytes + shipped.wire_bytes,
                                          written_bytes=figures.written_bytes + shipped.data_bytes)
                lag = time.time() - (figures.newest_taken_at or figures.since)
                if lag > rpo and not over:
                    self.ctx.journal.event(vm, "dr-lag", f"DR lag {lag:.0f} s is over the RPO ({rpo:g} s)")
                    over = True
                elif lag <= rpo and over:
                    self.ctx.journal.event(vm, "dr-lag", f"DR lag back to {lag:.0f} s, within the RPO ({rpo:g} s)")
                    over = False
                await self._report(vm, rec, figures)
        finally:
            if sender is not None:
                sender.close()
                if qemu is not None and qemu.alive:
                    with suppress(QemuError, OSError, asyncio.TimeoutError):
                        await asyncio.wait_for(sender.capture.stop(), 5)

    async def _sender(self, vm: str, qemu: QemuVm, receiver: str, spec: dict[str, Any]) -> DrSender:
        run_dir = qemu.paths.run_dir
        socket_path = run_dir / NBD_SOCKET
        try:
            await qemu.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket_path)}}})
        except QemuError as e:
            if "already running" not in str(e):
                raise
        nodes = [n["node-name"] for n in await qemu.execute("query-named-block-nodes", {"flat": True})
                 if str(n.get("node-name", "")).startswith("disk") and str(n["node-name"])[4:].isdigit()]
        own = self.run_as.own if self.run_as is not None else (lambda p: None)
        capture = PointCapture(qemu, sorted(nodes, key=lambda n: int(n[4:])), run_dir, socket_path,
                               own=lambda p: own(Path(p)))
        await capture.start()
        return DrSender(capture, vm, self.cfg.pool, dr_key(self.cfg.dr_secret, self.cfg.pool), _addr(receiver),
                        spec)

    async def _report(self, vm: str, rec: LocalRecord, figures: DrFigures) -> None:
        with suppress(EtcdError):
            await self.ctx.store.report_dr(vm, rec.token, figures, self.ctx.lease)
