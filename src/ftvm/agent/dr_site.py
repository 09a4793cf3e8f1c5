"""Asynchronous DR, the DR site's end on this host (host.toml dr_listen): receiving other
pools' recovery points (dr/receiver.py), publishing the points kept here
(state/dr-replicas), and starting them: test failovers (`ftvm dr test`: an isolated copy,
the replica untouched) and real ones (`ftvm dr failover`: the VM itself, once its source
has been silent for its dr_confirm and more).

A real failover, on the host keeping the replica:
  1. waits until the source was last heard `confirm_s + DR_FAILOVER_MARGIN_S` ago (the
     source starts the VM only within `confirm_s` of this site's last word, core/decide.py:
     so no start there can follow this one);
  2. fences the replica (dr/receiver.py: no more points; a source that asks is told, stops
     the VM and never starts it again);
  3. makes images of the chosen point and defines the VM here, level 0, on them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from ..core.model import (DR_FAILOVER_MARGIN_S, Desired, DiskSpec, DrConfirmation, DrFailover, DrPoint, DrReplica,
                          DrTest, Level, PoolSnapshot, RunState, VmSpec)
from ..core.dr_points import dr_loss, seconds_lost
from ..core.replication import Copies, Copy, CopyState
from ..core.records import RecordError
from ..dr.journal import FINAL, JournalError, Replica
from ..dr.receiver import Committed, Receiver
from ..dr.sender import ask_target
from ..qemu.runas import RunAs
from ..secret import derive
from ..store.etcd import EtcdError
from .config import AgentConfig
from .context import HostContext
from .copydir import copy_image
from .local import spawn

log = logging.getLogger("ftvm.agent.dr")
PUBLISH_EVERY_S = 5.0
FAILBACK_RETRY_S = 10.0  # a failback's last point not installed yet is tried again after this


def dr_key(secret: bytes, source_pool: str) -> bytes:
    """The key of one source pool's DR sessions (both pools hold the DR secret)."""
    return derive(secret, f"dr {source_pool}")


class DrSite:
    def __init__(self, cfg: AgentConfig, ctx: HostContext, run_as: RunAs | None) -> None:
        self.cfg, self.ctx, self.run_as = cfg, ctx, run_as
        self.receiver: Receiver | None = None
        self.published_lease = 0  # the lease the replica records were last published under
        self.unpublished: set[tuple[str, str]] = set()       # (pool, vm) with points not yet in the store
        self.published_at: dict[tuple[str, str], float] = {}  # monotonic
        self.point_bytes: dict[tuple[str, str, int], tuple[int, int]] = {}  # (pool, vm, n) -> (file size, data)
        self.testing: set[tuple[str, str]] = set()  # test copies being made
        self.tested: set[tuple[str, str]] = set()   # tests whose point was marked tested
        self.ending: set[str] = set()               # test copies being removed
        self.failing_over: set[tuple[str, str]] = set()
        self.failovers_tried: dict[tuple[str, str], float] = {}  # (pool, vm) -> asked_at of the last try
        self.raising: set[tuple[str, str]] = set()  # failed-over VMs whose level was asked to rise, once
        self.installing: set[str] = set()            # failbacks' last points being installed
        self.install_errors: dict[str, str] = {}     # vm -> the last install failure (said once)
        self.installs_looked_at = 0.0                # monotonic: the replicas were last looked at

    async def start(self) -> None:
        if self.cfg.dr_listen is None:
            return
        assert self.cfg.local_storage is not None  # (config: dr_listen needs it)
        secret = self.cfg.dr_secret
        self.receiver = Receiver(self.cfg.local_storage / "dr", lambda pool: dr_key(secret, pool), self._committed,
                                 on_contact_end=lambda pool, vm: self._changed((pool, vm)),
                                 on_final=self._final,
                                 seed=self._seed,
                                 failover_asked=self.ctx.store.dr_failover_asked)
        addr, port = self.cfg.dr_listen
        try:
            await self.receiver.serve(addr, port)
        except OSError as e:
            self.ctx.journal.event("", "error", f"cannot receive DR points on {addr}:{port}: {e}")
            self.receiver = None
            return
        await self._publish_all()

    async def close(self) -> None:
        if self.receiver is not None:
            await self.receiver.close()

    def sync(self, snapshot: PoolSnapshot) -> None:
        """After each tick: publish what changed; test failovers and failovers asked of the
        replicas kept here."""
        if self.receiver is None:
            return
        if self.published_lease != self.ctx.lease:
            self.published_lease = self.ctx.lease
            spawn(self._publish_all(), name="dr-publish-all")
        self._publish_due()
        self.receiver.set_asked(set(snapshot.dr_failovers))
        self._sync_tests(snapshot)
        self._sync_failovers(snapshot)
        self._sync_failbacks(snapshot)

    # --- the points kept here ------------------------------------------------------------
    def _committed(self, c: Committed) -> None:
        log.info("DR point %d of %s/%s committed (%d bytes)", c.number, c.pool, c.vm, c.stored_bytes)
        self._changed((c.pool, c.vm))

    def _changed(self, key: tuple[str, str]) -> None:
        self.unpublished.add(key)
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

    def _data_bytes(self, rep: Replica, pool: str, vm: str, n: int) -> int:
        """(In a thread.) What point n holds, read once per version of its file."""
        size = rep.point_path(n).stat().st_size
        got = self.point_bytes.get((pool, vm, n))
        if got is None or got[0] != size:
            got = (size, rep.data_bytes(n))
            self.point_bytes[(pool, vm, n)] = got
        return got[1]

    async def _publish(self, pool: str, vm: str) -> None:
        """Tell this pool which points of `pool`'s VM this host keeps (`ftvm dr points`)."""
        assert self.receiver is not None
        receiver = self.receiver

        try:
            replica = await asyncio.to_thread(self._summary, receiver, pool, vm)
            await self.ctx.store.publish_dr_replica(replica, self.ctx.lease)
        except (OSError, ValueError, JournalError, EtcdError) as e:
            log.warning("DR replica %s/%s not published: %s", pool, vm, e)

    def _summary(self, receiver: Receiver, pool: str, vm: str) -> DrReplica:
        """(In a thread.) The points kept here of `pool`'s VM, as the pool's record shows them."""
        d = self._replica_dir(pool, vm)
        rep = Replica(d)
        tested = rep.tested()
        points = tuple(DrPoint(n, rep.header(n).taken_at, n in tested, self._data_bytes(rep, pool, vm, n))
                       for n in rep.numbers())
        return DrReplica(pool, vm, self.cfg.name, points, rep.sizes, time.time(), receiver.contact(pool, vm),
                         Replica.is_failed_over(d))

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


    # --- failovers (this host keeps the points) ------------------------------------------
    def _failovers_dir(self) -> Path:
        assert self.cfg.local_storage is not None
        return self.cfg.local_storage / "dr-failovers"

    def _sync_failovers(self, snapshot: PoolSnapshot) -> None:
        """Start each failover asked of a replica kept here, once (its VM defined: done); end
        each whose failback switched over, once its VM here stopped."""
        for key, failover in snapshot.dr_failovers.items():
            view = snapshot.vms.get(failover.vm)
            if (failover.started and failover.level and view is not None and view.owner is not None
                    and view.status is not None and view.status.state is RunState.RUNNING
                    and view.spec.level is Level.UNPROTECTED and view.level_change is None
                    and failover.host == self.cfg.name and key not in self.raising):
                self.raising.add(key)
                spawn(self._raise_level(failover), name=f"dr-level-{failover.vm}")
            if failover.switched and failover.host == self.cfg.name and key not in self.failing_over:
                view = snapshot.vms.get(failover.vm)
                if view is None or view.owner is None:
                    self.failing_over.add(key)
                    spawn(self._end_failover(failover), name=f"dr-failed-back-{failover.vm}")
                continue
            if (failover.host != self.cfg.name or key in self.failing_over or failover.vm in snapshot.vms
                    or self.failovers_tried.get(key) == failover.asked_at or self._started(failover)):
                continue  # (asked again after a failure: tried again; started and removed since: over)
            self.failing_over.add(key)
            self.failovers_tried[key] = failover.asked_at
            spawn(self._fail_over(failover), name=f"dr-failover-{failover.vm}")

    def _started(self, failover: DrFailover) -> bool:
        return (self._failovers_dir() / failover.pool / failover.vm / "started").exists()

    async def _fail_over(self, f: DrFailover) -> None:
        assert self.receiver is not None
        key = (f.pool, f.vm)
        try:
            waited = False
            while True:  # 1. the source silent long enough that it can no longer start the VM
                # (its session may still look open: a dead host's connection is half-open).
                # Silent here, and since the failover was asked: from then on every host of
                # this pool answers "failed over" (Receiver.set_asked and its store read), but
                # a word another host gave before counts until then.
                contact = self.receiver.contact(f.pool, f.vm)
                quiet = contact.confirm_s + DR_FAILOVER_MARGIN_S
                left = max(contact.heard_at, f.asked_at) + quiet - time.time()
                if left <= 0 and self.receiver.fence(f.pool, f.vm, quiet):
                    break
                if not waited:
                    self.ctx.journal.event(f.vm, "dr", f"failover of {f.pool}/{f.vm}: waiting {left:.0f} s more "
                                                       f"for its site to stay silent (it may start the VM until "
                                                       f"{contact.confirm_s:g} s after it last heard from here)")
                    waited = True
                await asyncio.sleep(min(max(left, 0.5), 5.0))
            await self.receiver.seal(f.pool, f.vm)  # 2. no more points; the source is told
            self._changed((f.pool, f.vm))  # (published as failed over)
            rep = Replica(self._replica_dir(f.pool, f.vm))
            if f.newest:  # (the record the operator saw may have lagged the newest point)
                summary = await asyncio.to_thread(self._summary, self.receiver, f.pool, f.vm)
                if summary.points:
                    newest = summary.points[-1].number
                    f = replace(f, point=newest, loss=dr_loss(summary, newest, time.time()),
                                lost_s=seconds_lost(summary, newest))
            spec_json = rep.spec()
            if spec_json is None:
                raise JournalError("the owner never sent the VM's spec (an older ftvm)")
            source = VmSpec.from_json(spec_json)
            dest = self._failovers_dir() / f.pool / f.vm
            images = await asyncio.to_thread(rep.materialize, f.point, dest)  # 3. its images, and the VM
            if self.run_as is not None:
                self.run_as.own(*images)
            spec = replace(source, level=Level.UNPROTECTED, desired=Desired.RUNNING, preferred_host=self.cfg.name,
                           site="", dr_target="", dr_rpo_s=0.0, dr_failed_over="", failback=False, definition="",
                           disks=tuple(DiskSpec(str(p), "raw") for p in images))
            if not await self.ctx.store.define_vm(spec):
                raise RecordError(f"a VM named {f.vm} exists in this pool already")
            (dest / "started").touch()
            await self.ctx.store.update_dr_failover(replace(f, started=True))
            self.ctx.journal.event(f.vm, "dr-failover", f"{f.pool}/{f.vm} failed over to {self.cfg.name} from "
                                                         f"point {f.point}, level 0: {f.loss}")
        except (OSError, ValueError, JournalError, RecordError, EtcdError) as e:
            self.ctx.journal.event(f.vm, "error", f"DR failover of {f.pool}/{f.vm} failed: {e}")
        finally:
            self.failing_over.discard(key)

    async def _raise_level(self, f: DrFailover) -> None:
        """A failover asked at level 2 or 3: the VM started at level 0 on its images here; now
        its level rises online, as `ftvm vm level` would (a replica on another host)."""
        from .. import ops
        from ..errors import FtvmError
        try:
            await ops.change_level(self.ctx.store, f.vm, f.level)
            self.ctx.journal.event(f.vm, "dr-failover", f"raising {f.vm} to level {f.level}, as its failover asked")
        except (FtvmError, EtcdError) as e:
            self.ctx.journal.event(f.vm, "error", f"{f.vm} runs at level 0: raising it to level {f.level} failed: "
                                                  f"{e}")

    async def _end_failover(self, f: DrFailover) -> None:
        """A failback switched over and the VM stopped here: its definition and images go, and
        the replica of its home pool takes points again (the home pool runs it now)."""
        assert self.receiver is not None
        try:
            got = await self.ctx.store.spec(f.vm)
            if got is not None and not await self.ctx.store.remove_vm(f.vm, got[1]):
                return  # (changed meanwhile, or still owned: the next tick tries again)
            await asyncio.to_thread(shutil.rmtree, self._failovers_dir() / f.pool / f.vm, True)
            self.receiver.unfence(f.pool, f.vm)
            await self.ctx.store.end_dr_failover(f.pool, f.vm)
            self._changed((f.pool, f.vm))
            self.ctx.journal.event(f.vm, "dr-failback", f"{f.pool}/{f.vm} failed back to {f.failback_target}: "
                                                        "removed here; its points come from its home pool again")
        except (OSError, JournalError, EtcdError) as e:
            log.warning("%s: failback not ended here yet: %s", f.vm, e)
        finally:
            self.failing_over.discard((f.pool, f.vm))

    # --- failback, at the home pool (this host receives the VM's points from the DR pool) ----
    def _copies_of(self, spec: VmSpec) -> list[tuple[Path, str]] | None:
        """This host's images of the VM: its level 2-3 copies, or the disks it names."""
        if spec.level.has_copies:
            if self.cfg.local_storage is None:
                return None
            fmt = "raw" if spec.level is Level.SYSTEM else self.cfg.local_format
            return [(Path(img.path), img.format) for img in
                    (copy_image(self.cfg.local_storage, spec.name, i, fmt) for i in range(len(spec.disks)))]
        return [(Path(d.path), d.format) for d in spec.disks]

    def _final(self, c: Committed) -> None:
        self._install_back(c.pool, c.vm, c.number)

    def _sync_failbacks(self, snapshot: PoolSnapshot) -> None:
        """Failbacks' last points received here and not installed yet (a failure, an agent
        restart): tried again every FAILBACK_RETRY_S while the VM is still failed over."""
        now = time.monotonic()
        if now < self.installs_looked_at + FAILBACK_RETRY_S or self.cfg.local_storage is None:
            return
        self.installs_looked_at = now
        for marker in (self.cfg.local_storage / "dr").glob(f"*/*/{FINAL}"):
            d = marker.parent
            view = snapshot.vms.get(d.name)
            number = Replica.final_point(d)
            if view is not None and view.spec.dr_failed_over and number is not None:
                self._install_back(d.parent.name, d.name, number)

    def _install_back(self, pool: str, vm: str, number: int) -> None:
        if vm not in self.installing:
            self.installing.add(vm)
            spawn(self._fail_back(pool, vm, number), name=f"dr-failback-{vm}")

    def _seed(self, pool: str, vm: str, sizes: tuple[int, ...]) -> list[tuple[Path, str]] | None:
        """(In a thread.) A replica of a VM of this pool that was failed over starts from its
        old images here: the DR pool's first point is then a diff of what changed since."""
        snap = self.ctx.latest()
        view = snap.vms.get(vm) if snap else None
        if view is None or not view.spec.dr_failed_over:
            return None
        images = self._copies_of(view.spec)
        return images if images is not None and all(p.exists() for p, _ in images) else None

    async def _fail_back(self, pool: str, vm: str, number: int) -> None:
        """A failback's last point arrived (the DR pool stopped the VM after it): install it as
        this host's images of the VM, and once the DR site no longer says it runs the VM,
        start it here. On failure the point stays (marked final) and is tried again."""
        try:
            got = await self.ctx.store.spec(vm)
            snap = self.ctx.latest()
            if got is None or not got[0].dr_failed_over or snap is None or vm not in snap.vms:
                raise JournalError(f"this pool has no VM {vm} that was failed over")
            spec, revision = got
            images = self._copies_of(spec)
            if images is None:
                raise JournalError("this host keeps no images of it")
            back_dir = self._failovers_dir() / "back" / vm
            await asyncio.to_thread(shutil.rmtree, back_dir, True)  # (an earlier attempt's)
            made = await asyncio.to_thread(Replica(self._replica_dir(pool, vm)).materialize, number, back_dir)
            for (dest, fmt), raw in zip(images, made, strict=True):
                await asyncio.to_thread(_install, raw, dest, fmt)
                if self.run_as is not None:
                    self.run_as.own(dest)
            await self._until_released(spec)
            view = snap.vms[vm]
            copies = None
            if spec.level.has_copies and view.copies is not None:
                now = time.time()
                copies = Copies(view.copies.gen + 1, {
                    h: (Copy(CopyState.CURRENT, now, "failed back from the DR pool") if h == self.cfg.name else
                        Copy(CopyState.OUTDATED, now, "failed back from the DR pool", full=True))
                    for h in set(view.copies.copies) | {self.cfg.name}})
            back = replace(spec, dr_failed_over="", desired=Desired.RUNNING, stop_force=False)
            if not await self.ctx.store.fail_back(back, revision, copies):
                raise JournalError("its spec changed, or a host claimed it, meanwhile")
            if spec.dr_target:
                await self.ctx.store.confirm_dr(vm, DrConfirmation(time.time(), spec.dr_target, self.cfg.name))
            await asyncio.to_thread(shutil.rmtree, self._failovers_dir() / "back" / vm, True)
            await asyncio.to_thread(shutil.rmtree, self._replica_dir(pool, vm), True)
            await self.ctx.store.withdraw_dr_replica(pool, vm)
            self.ctx.journal.event(vm, "dr-failback", f"back from DR pool {pool}: its last point ({number}) "
                                                      f"installed on {self.cfg.name}; starting it here")
            self.ctx.wake()
            self.install_errors.pop(vm, None)
        except (OSError, ValueError, JournalError, RecordError, EtcdError) as e:
            if self.install_errors.get(vm) != str(e):
                self.install_errors[vm] = str(e)
                self.ctx.journal.event(vm, "error", f"failback of {vm} from {pool}: installing its last point "
                                                    f"({number}) failed: {e}. It is kept here; tried again every "
                                                    f"{FAILBACK_RETRY_S:g} s")
        finally:
            self.installing.discard(vm)

    async def _until_released(self, spec: VmSpec, timeout: float = 120.0) -> None:
        """Until the DR site answers that it no longer runs the VM (it stops it after the last
        point, then takes this pool's points again)."""
        snap = self.ctx.latest()
        target = snap.dr_targets.get(spec.dr_target) if snap else None
        if target is None:
            return  # (no forward DR target: the DR pool stopped it after the point, nothing to ask)
        deadline = time.monotonic() + timeout
        while True:
            word = await ask_target(target.receivers, dr_key(self.cfg.dr_secret, self.cfg.pool), self.cfg.pool,
                                    spec.name)
            if word.state is not None and not word.state["failed_over"]:
                return
            if time.monotonic() > deadline:
                raise JournalError(f"DR target {spec.dr_target} still says it runs {spec.name}")
            await asyncio.sleep(1.0)


def _install(raw: Path, dest: Path, fmt: str) -> None:
    """A raw image made from a point becomes `dest` (converted to its format)."""
    if fmt == "raw":
        os.replace(raw, dest)
        return
    tmp = dest.with_name(dest.name + ".failback")
    proc = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise JournalError(f"converting to {fmt}: {proc.stderr.strip()}")
    os.replace(tmp, dest)
