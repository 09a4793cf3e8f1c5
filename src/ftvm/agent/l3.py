"""Level 3 in the agent: the owner's checkpointing runtime and the partner's standby.

Owner (`L3Primary`, one per running VM): the output-commit relays own the VM's
taps and listen before QEMU starts; QEMU runs with its RAM in a shared file.
A protection loop connects to the partner named in the copies record, pre-copies
while the guest runs, and checkpoints every `checkpoint_ms`. The partner's copy
becomes *current* in etcd after its first acknowledged checkpoint. When the
partner falls silent or the link fails, held output stays held until the copy
is recorded *outdated* under our fencing token; only then does output flow
unprotected. If that write fails because we no longer own the VM (the partner
took over), QEMU is killed: the held output never leaves.

Partner (`L3Partner`, one per agent): a listener on the replication address
feeds one `Standby` per VM it protects. A primary silent for
`l3_takeover_after` with a committed checkpoint here is taken over (decided by
`decide`, carried out here): freeze the standby, end the old owner's ownership
in one transaction that also names this copy the only current one (it fails if
the primary recorded us outdated first), claim, and resume QEMU from the
replica (`-incoming defer`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from dataclasses import replace
from pathlib import Path

from typing import Any

from ..core.model import CheckpointFigures, Desired, Level, LocalStandby, PoolSnapshot, VmSpec, valid_name
from ..core.replication import Copies, CopyState, mark, take_over
from ..core.sites import across_sites, compresses, cut_check_s, yields_in_cut
from ..qemu.migrate import wait_migration
from ..l3.primary import EXACT, Checkpointer
from ..l3.relay import OutputCommitRelay
from ..l3.channel import LinkConfig
from ..l3.standby import ReplicaPaths, Standby, StandbyServer
from ..l3.vcpu_load import VcpuLoad
from ..l3.wire import WireError
from ..l3.writes import COMPARE, Support, WriteTracker
from ..qemu.cmdline import VmPaths, tap_names
from ..qemu.monitor import DirectQmp
from ..qemu.process import QemuError, QemuVm, ensure_tap, open_tap, remove_tap, set_migration_tls, tap_on_bridge
from ..store.etcd import EtcdError
from ..store.pool import OwnershipLost
from .context import HostContext, VmContext
from .copydir import copy_image
from .warm import WarmStandbys

log = logging.getLogger("ftvm.agent.l3")

EventFn = Callable[[str, str, str], None]
RETRY_S = 2.0
FIGURES_S = 2.0           # how often the figures are published while protected
FIGURES_WINDOW_S = 10.0   # ... computed over the epochs of this many seconds
WATCH_S = 0.02            # the partner looks at its primaries' silence this often
WARM_AFTER_S = 1.0        # a session protected this long gets its QEMU started ahead
# A session heard from this recently is the live one: a second HELLO for the VM is refused
# meanwhile. Not l3_partner_lost (0.15 s): a loaded host's live session can fall that
# silent for a moment, and the hostile-peer test saw a duplicate HELLO admitted. A primary
# that gave up on its session reconnects only RETRY_S (2 s) later, by then stale.
LIVE_WITHIN_S = 1.0
# A primary silent past l3_takeover_after whose agent still accepts a connection on its
# checkpoint port (PROBE_S to answer) is given up to PROBE_UNTIL_S of silence: a stalled
# event loop on a loaded host, not a lost host. A hung agent is taken over then.
PROBE_S = 0.1
PROBE_UNTIL_S = 1.0


def replica_paths(spec: VmSpec, ram_dir: Path, local_storage: Path) -> ReplicaPaths:
    """Where a host keeps its level 3 copy of a VM: the same files it runs the VM from.
    The committed device state and its record sit in the copy directory beside the disks,
    so they belong to the same VM definition (agent/copydir.py): a VM defined again under
    the name can never resume from the old one's checkpoint. The RAM file is used only
    with that record, and replaced by a cold boot."""
    copy_dir = local_storage / spec.name
    return ReplicaPaths(ram=ram_dir / spec.name / "ram",
                        disks=tuple(Path(copy_image(local_storage, spec.name, i, "raw").path)
                                    for i in range(len(spec.disks))),
                        device_state=copy_dir / "l3-device-state",
                        meta=copy_dir / "l3-committed.json")


async def prepare_incoming(qemu: QemuVm) -> None:
    """A QEMU that will load a level 3 device state: shared RAM is not in the stream, which
    comes over a local socket (no TLS, though a live migration's target has it set)."""
    await qemu.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]})
    await set_migration_tls(qemu, "")


def is_partner(snapshot: PoolSnapshot, me: str, vm: str) -> bool:
    """Whether this host should keep a standby for `vm`: level 3, running elsewhere,
    and this host holds one of its copies."""
    view = snapshot.vms.get(vm)
    return (view is not None and view.spec.level is Level.SYSTEM and view.owner is not None
            and view.owner.host != me and view.copies is not None and me in view.copies.copies)


class L3Primary:
    def __init__(self, ctx: VmContext, spec: VmSpec, paths: VmPaths, files: ReplicaPaths, link: LinkConfig,
                 count_checkpoints: Callable[[int], None] = lambda n: None,
                 tracking: Support = COMPARE, track_disks: bool = False,
                 no_dr_points: Callable[[str], AbstractAsyncContextManager[None]] | None = None) -> None:
        """`tracking`: whether this host tracks written RAM pages exactly (l3/writes.py).
        `track_disks`: disk writes from QEMU dirty bitmaps (l3/disk_writes.py), else compared.
        `no_dr_points(vm)`: held while checkpointing: no DR point is cut on this QEMU meanwhile
        (a point's backup job makes device-state saves fail; the partner cuts them from its
        replica instead: agent/dr.py)."""
        self.ctx = ctx
        self.no_dr_points = no_dr_points or (lambda vm: nullcontext())
        self.tracking, self.track_disks = tracking, track_disks
        self._full_resyncs_seen = 0
        self.spec, self.token, self.me = spec, ctx.token, ctx.me
        self.count_checkpoints = count_checkpoints  # metrics: checkpoints taken (a counter)
        self._counted = 0  # checkpoints counted (metrics) of the session `_counted_in`
        self._counted_in: Checkpointer | None = None
        self.paths, self.files = paths, files
        self.store, self.snapshot, self.event = ctx.store, ctx.snapshot, ctx.event
        self.timing, self.link = ctx.host.timing, link
        self.relays: list[OutputCommitRelay] = []
        self._tap_fds: list[int] = []
        self.qemu: QemuVm | None = None
        self.checkpointer: Checkpointer | None = None
        self.state, self.reason, self.partner = "unprotected", "checkpointing has not started", ""
        self.sync_done = 0.0
        self.superseded = False  # the partner took over: this copy was killed on purpose
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # --- launch ------------------------------------------------------------------------
    async def open_relays(self, bridge: str, attach: bool = True) -> None:
        """The relays listen before QEMU starts (QEMU 7.2's stream netdev does not reconnect).
        `attach=False`: the taps are attached later (`attach_taps`), once free."""
        for i, tap in enumerate(tap_names(self.spec)):
            fd = -1
            if attach:
                ensure_tap(tap, bridge)
                fd = open_tap(tap)
                self._tap_fds.append(fd)
            relay = OutputCommitRelay(self.paths.nic_socket(i), fd, gated=False)
            await relay.start()
            self.relays.append(relay)

    def attach_taps(self, bridge: str, fresh: bool = True) -> None:
        """The old QEMU is gone (its taps with it, or left behind): the relays open them and
        put them on the bridge. `fresh=False`: a tap already on the bridge (made for a warm
        QEMU, agent/warm.py) is opened as it is."""
        for relay, tap in zip(self.relays, tap_names(self.spec), strict=True):
            # a fresh tap: the old QEMU's may still be being torn down by the kernel, and an fd
            # on a dying device would carry nothing (seen as a silent NIC after the switch)
            if fresh or not tap_on_bridge(tap, bridge):
                ensure_tap(tap, bridge)
            fd = open_tap(tap)
            self._tap_fds.append(fd)
            relay.attach_tap(fd)

    def use_relays(self, relays: list[OutputCommitRelay], bridge: str) -> None:
        """A warm QEMU's relays (already connected to it), given the taps it waited for."""
        self.relays = list(relays)
        self.attach_taps(bridge, fresh=False)

    async def resume_from_replica(self, qemu: QemuVm, prepared: bool = False) -> None:
        """QEMU was started with `-incoming defer -S` on the replica files: load the last
        committed device state and run (the agent then announces the VM's MACs).
        `prepared`: `prepare_incoming` was done already (a warm QEMU)."""
        if not prepared:
            await prepare_incoming(qemu)
        # QEMU listens, we send the committed device state (no shell, no forked helper)
        sock = self.paths.run_dir / "incoming.sock"
        sock.unlink(missing_ok=True)
        await qemu.execute("migrate-incoming", {"uri": f"unix:{sock}"})
        _, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(await asyncio.to_thread(self.files.device_state.read_bytes))
        await writer.drain()
        writer.close()
        await wait_migration(qemu, "loading the replica's device state", timeout=30, poll=0.002)
        await qemu.execute("cont")

    def begin(self, qemu: QemuVm) -> None:
        self.qemu = qemu
        self._tasks = [asyncio.create_task(self._protect_loop(), name=f"l3-protect-{self.spec.name}"),
                       asyncio.create_task(self._publish_loop(), name=f"l3-figures-{self.spec.name}")]

    # --- protection loop ------------------------------------------------------------------
    async def _protect_loop(self) -> None:
        assert self.qemu is not None
        while not self._closed and self.qemu.alive:
            snap = self.snapshot()
            view = snap.vms.get(self.spec.name) if snap else None
            partner = view.copies.partner_of(self.me) if view and view.copies else None
            host = snap.hosts.get(partner) if snap and partner else None
            if partner is None or host is None or not host.replication_addr:
                self._set("unprotected", f"partner {partner} is down" if partner else "no partner host")
                await asyncio.sleep(RETRY_S)
                continue
            self.partner = partner
            try:
                async with self.no_dr_points(self.spec.name):  # (a point in flight ends first)
                    await self._session(partner, host.replication_addr, compresses(
                        self.link.compress_when, snap is not None and across_sites(snap, self.me, partner)))
            except Exception as e:  # a defect here must not leave the VM unprotected for good
                log.exception("%s: level 3 session with %s failed", self.spec.name, partner)
                self._set("unprotected", f"checkpointing to {partner} failed: {type(e).__name__}: {e}")
                self.event("warning", f"level 3 session with {partner} failed "
                                      f"({type(e).__name__}: {e}): retrying")
                if self.checkpointer is not None:
                    with suppress(Exception):
                        await self.checkpointer.close()
                    self.checkpointer = None
            if not self._closed:
                await asyncio.sleep(RETRY_S)

    async def _session(self, partner: str, addr: str, compress: bool) -> None:
        assert self.qemu is not None
        qemu = self.qemu
        ram_writes = ((lambda ram: WriteTracker.attach(qemu.pid, qemu.pidfd, ram)) if self.tracking.exact
                      else None)
        monitor = await self._checkpoint_monitor()
        cp = Checkpointer(self.spec.name, monitor, self.relays, self.files.ram, list(self.files.disks),
                          self.paths.run_dir, self.spec.checkpoint_ms / 1000, self.timing.l3_partner_lost,
                          on_output=self.spec.checkpoint_on_output, stall_s=self.timing.l3_checkpoint_stall,
                          ram_writes=ram_writes, tracking=self.tracking.why,
                          disk_nodes=[f"disk{i}" for i in range(len(self.spec.disks))] if self.track_disks else None,
                          vcpu_load=await self._vcpu_load(monitor))
        self._full_resyncs_seen = 0
        self.checkpointer = cp
        try:
            await self._checkpoint_to(cp, partner, addr, compress)
        finally:
            if isinstance(monitor, DirectQmp):
                await monitor.close()

    async def _vcpu_load(self, monitor: DirectQmp | QemuVm) -> VcpuLoad | None:
        """The guest's vCPU threads, for output-triggered epochs (None: spaced by the pause)."""
        assert self.qemu is not None
        try:
            cpus = await monitor.execute("query-cpus-fast")
            return VcpuLoad(self.qemu.pid, [int(c["thread-id"]) for c in cpus])
        except (QemuError, OSError, KeyError, TypeError, ValueError) as e:
            log.warning("%s: vCPU threads not readable (%s): output-triggered epochs are spaced by the pause",
                        self.spec.name, e)
            return None

    async def _checkpoint_monitor(self) -> DirectQmp | QemuVm:
        """The QEMU's checkpoint monitor (qemu/monitor.py), or its main one if it has none
        (started by an earlier ftvm) or it does not answer: slower, otherwise the same."""
        assert self.qemu is not None
        path = self.paths.checkpoint_qmp
        if path.exists():
            monitor = DirectQmp(path)
            try:
                await monitor.connect()
                return monitor
            except QemuError as e:
                await monitor.close()
                log.warning("%s: checkpoint monitor: %s; checkpointing through the main one", self.spec.name, e)
        return self.qemu

    async def _checkpoint_to(self, cp: Checkpointer, partner: str, addr: str, compress: bool) -> None:
        assert self.qemu is not None
        try:
            await cp.connect(addr, replace(self.link, compress=compress), uuid.uuid4().hex)
        except (OSError, TimeoutError, WireError) as e:
            self._set("unprotected", f"cannot reach partner {partner} at {addr}:{self.link.port}: "
                                     f"{e or type(e).__name__}")
            await cp.close()
            self.checkpointer = None
            return
        try:
            if not await self._record(partner, CopyState.SYNCING, "first copy (pre-copy) under way"):
                raise OwnershipLost("the partner's copy could not be recorded: no longer the owner")
            self._set("syncing", "first copy under way")
            await cp.prepare_qemu()
            t0 = time.monotonic()
            await cp.protect(self._progress)
            if self.tracking.exact and cp.stats.tracking != EXACT:
                self.event("warning", f"written RAM pages cannot be tracked in this QEMU: {cp.stats.tracking}")
            if not await self._record(partner, CopyState.CURRENT, f"checkpoint {cp.stats.acked} acknowledged"):
                raise OwnershipLost("the partner's copy could not be recorded: no longer the owner")
            self._set("protected", "")
            self.event("protected",
                       f"replica on {partner} in sync after {time.monotonic() - t0:.1f}s (pre-copy "
                       f"{cp.stats.precopy_bytes / 2**20:.0f} MiB while the guest ran, then checkpoint 1); "
                       f"checkpointing every {self.spec.checkpoint_ms} ms")
            await cp.run()
            why = cp.lost or "checkpointing stopped"
            kept = not self._closed and await self._partner_lost(cp, partner, why)
        except OwnershipLost:
            kept = False
        except (OSError, TimeoutError, RuntimeError, EtcdError) as e:
            why = cp.lost or f"{type(e).__name__}: {e}"
            kept = not self._closed and await self._partner_lost(cp, partner, why)
        if not kept and not self._closed:
            self.event("fence", f"lost ownership while checkpointing to {partner} (it took "
                                "over): killing this copy, held output discarded")
            for relay in self.relays:
                relay.discard()
            self.superseded = True
            self.qemu.kill()
        await cp.close()
        self.checkpointer = None

    async def _partner_lost(self, cp: Checkpointer, partner: str, why: str) -> bool:
        """Output stays held until the partner's copy is recorded outdated under our token;
        then it flows unprotected. False if we no longer own the VM."""
        self._set("unprotected", f"replica on {partner} lost: {why}")
        # The partner may be taking over right now: the guest stops executing until this
        # host's claim to carry on is recorded (one etcd write, ~10 ms, when quorum is there).
        # Without quorum it stays stopped and the fence guard kills it before the lease ends.
        assert self.qemu is not None
        with suppress(QemuError):
            await self.qemu.execute("stop")
        await self._leave_to_preferred_site()
        recorded = await self._record(partner, CopyState.OUTDATED, f"partner lost: {why}", until_done=True)
        if not recorded:
            return False  # the partner carries on: this copy is killed, still stopped
        released = cp.unprotect()
        if not self._closed and self.qemu.alive:
            await self.qemu.execute("cont")
        self.event("unprotected", f"replica on {partner} recorded outdated ({why}); "
                                  f"running on unprotected, {released} held frames released")
        return True

    async def _leave_to_preferred_site(self) -> None:
        """SplitSite (core/sites.py): at another site than the VM's preferred one, with the
        partner there and up, give the partner time to take the VM over (the guest stopped,
        output held) instead of recording its copy outdated at once. If it has not within a
        few keepalives, the caller records it outdated and carries on (either write is safe:
        one etcd transaction wins)."""
        snap = self.snapshot()
        view = snap.vms.get(self.spec.name) if snap else None
        why = yields_in_cut(snap, view, self.me) if snap and view else None
        if why is None:
            return
        wait = cut_check_s(self.ctx.host.timing.keepalive_interval)
        self.event("site", f"{why}: output held, guest stopped, waiting up to {wait:g} s for it to take over")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self._closed and self.qemu is not None and self.qemu.alive:
            view = self.ctx.view()
            if view is None or view.owner is None or view.owner.token != self.token:
                return  # taken over: the record below fails, and this copy is killed
            await asyncio.sleep(0.05)
        if not self._closed:
            self.event("site", "no takeover came: the replica's copy is recorded outdated, the VM carries on here")

    async def _record(self, partner: str, state: CopyState, reason: str, until_done: bool = False) -> bool:
        """Write the partner copy's state under our token. False if we lost ownership.
        `until_done`: keep trying while etcd is unreachable (the fence guard kills the VM
        if that lasts); held output waits meanwhile."""
        def record(seen: Copies) -> Copies | None:
            current = seen.state_of(partner)
            if current is not None and current.state is state and state is not CopyState.OUTDATED:
                return None
            return mark(seen, partner, state, reason, time.time(), full=state is CopyState.OUTDATED)
        while not self._closed:
            try:
                await self.store.update_copies(self.spec.name, self.token, record)
                return True
            except OwnershipLost:
                return False
            except EtcdError as e:
                if not until_done:
                    raise
                log.warning("%s: cannot record the replica %s yet: %s", self.spec.name, state.value, e)
                await asyncio.sleep(0.1)
        return False

    def _progress(self, done: float) -> None:
        self.sync_done = done

    def _set(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason

    # --- figures ------------------------------------------------------------------------
    def figures(self) -> CheckpointFigures:
        cp = self.checkpointer
        if cp is None:
            return CheckpointFigures(self.partner, self.state, self.reason, tracking=self.tracking.why)
        w = cp.stats.window(FIGURES_WINDOW_S)
        if not w["epochs"]:  # (a long wait for the link, or nothing yet)
            return CheckpointFigures(self.partner, self.state, self.reason, sync_done=round(self.sync_done, 3),
                                     tracking=cp.stats.tracking, link_bound=w["link_bound"],
                                     compressed=cp.compressed)
        return CheckpointFigures(
            partner=self.partner, state=self.state, reason=self.reason, per_s=w["per_s"],
            pause_p50_ms=w["pause_p50_ms"], pause_p99_ms=w["pause_p99_ms"],
            ram_diff_p50_ms=w["ram_diff_p50_ms"], disk_diff_p50_ms=w["disk_diff_p50_ms"],
            device_state_p50_ms=w["device_state_p50_ms"], running_fraction=w["running_fraction"],
            dirty_pages_p50=w["dirty_pages_p50"], disk_pages_p50=w["disk_pages_p50"],
            link_bytes_per_s=w["wire_bytes_per_s"], raw_bytes_per_s=w["bytes_per_s"], compressed=cp.compressed,
            link_bound=w["link_bound"], link_wait_p50_ms=w["link_wait_p50_ms"],
            epoch=cp.stats.acked, sync_done=round(self.sync_done, 3),
            tracking=cp.stats.tracking, full_resyncs=cp.stats.full_resyncs, disk_tracking=cp.stats.disk_tracking,
            stop_p50_ms=w["stop_p50_ms"], cont_p50_ms=w["cont_p50_ms"], ack_p50_ms=w["ack_p50_ms"],
            partner_silence_max_ms=w["silence_max_ms"], output_wait_p50_ms=w["output_wait_p50_ms"],
            reply_p50_ms=w["reply_p50_ms"], frames_p50=w["frames_p50"])

    async def _publish_loop(self) -> None:
        last: CheckpointFigures | None = None
        while not self._closed:
            self._follow_spec()
            cp = self.checkpointer
            if cp is not None:
                if cp is not self._counted_in:  # a new session counts from 0
                    self._counted_in, self._counted = cp, 0
                self.count_checkpoints(cp.stats.epochs - self._counted)
                self._counted = cp.stats.epochs
            if cp is not None and cp.stats.full_resyncs > self._full_resyncs_seen:
                self._full_resyncs_seen = cp.stats.full_resyncs
                self.event("warning", f"a dirty-page scan failed ({cp.stats.tracking_error}): every RAM page "
                                      f"was sent in that checkpoint ({cp.stats.full_resyncs} so far)")
            fig = self.figures()
            if fig != last:
                with suppress(EtcdError):
                    await self.store.report_checkpoints(self.spec.name, self.token, fig, self.ctx.lease)
                    last = fig
            await asyncio.sleep(FIGURES_S if self.state == "protected" else 0.5)

    def _follow_spec(self) -> None:
        """The checkpoint interval and trigger may change while the VM runs (`vm set`)."""
        snap = self.snapshot()
        view = snap.vms.get(self.spec.name) if snap else None
        cp = self.checkpointer
        if view is None or cp is None:
            return
        spec = view.spec
        if (spec.checkpoint_ms, spec.checkpoint_on_output) != (self.spec.checkpoint_ms,
                                                               self.spec.checkpoint_on_output):
            self.spec = spec
            cp.set_interval(spec.checkpoint_ms / 1000, spec.checkpoint_on_output)
            self.event("checkpoints", f"checkpoint interval now {spec.checkpoint_ms} ms"
                                      + (", and on output" if spec.checkpoint_on_output else ""))

    def partner_current(self) -> bool:
        snap = self.snapshot()
        view = snap.vms.get(self.spec.name) if snap else None
        return bool(view and self.partner and view.copy_state(self.partner) is CopyState.CURRENT)

    async def final_checkpoint(self) -> tuple[str, int]:
        """Planned switchover to the partner (live migration): stop the guest, checkpoint,
        wait for the partner's ACK. Returns (partner, epoch). On RuntimeError the guest
        may be stopped: call `resume_after_switchover_failed()`."""
        cp = self.checkpointer
        if cp is None or self.state != "protected":
            raise RuntimeError(f"the replica is not in sync ({self.state}: {self.reason or 'no session'})")
        return self.partner, await cp.final_checkpoint()

    async def resume_after_switchover_failed(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.cancel_final()
        if self.qemu is not None and self.qemu.alive and not self._closed:
            await self.qemu.execute("cont")

    async def hand_off(self) -> None:
        """The partner now owns the VM, resumed from the final checkpoint: end quietly
        (every frame was released by its ACK; this host's paused copy is killed next)."""
        self.superseded = True
        await self.close()

    async def end_protection(self, why: str) -> None:
        """Lowering the level while the guest runs: no checkpoint under way, the partner's
        copy recorded outdated under our token (it can no longer take over), then held
        output released and the relays left as plain pass-throughs for this QEMU's life.
        RuntimeError if ownership was lost (the caller kills QEMU)."""
        cp = self.checkpointer
        if cp is not None:
            await cp.hold()  # the current epoch ends; no new one starts
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.partner and not await self._record(self.partner, CopyState.OUTDATED, why, until_done=True):
            raise RuntimeError("this host no longer owns the VM")
        released = 0
        for relay in self.relays:
            relay.gated = False
            released += relay.release(1 << 62)
        if cp is not None:
            await cp.close()
            self.checkpointer = None
        if self.qemu is not None and (await self.qemu.execute("query-status"))["status"] == "paused":
            await self.qemu.execute("cont")
        self.partner = ""  # nothing to retire at a stop any more
        self._set("unprotected", why)
        self.event("unprotected", f"{why}: checkpointing ended, {released} held frames released")

    async def retire(self, why: str) -> None:
        """A stop was asked: end checkpointing and record the partner's copy outdated (this
        host's copy becomes the only current one), so the partner never takes over."""
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self.checkpointer is not None:
            await self.checkpointer.close()
            self.checkpointer = None
        if self.partner:
            self._closed = False
            try:
                await self._record(self.partner, CopyState.OUTDATED, why)
            finally:
                self._closed = True

    async def close(self) -> None:
        if self._closed and not self.relays:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self.checkpointer is not None:
            await self.checkpointer.close()
        for relay in self.relays:
            relay.discard()
            await relay.close()
        for fd in self._tap_fds:
            with suppress(OSError):
                os.close(fd)
        for tap in tap_names(self.spec):
            remove_tap(tap)
        self.relays, self._tap_fds = [], []


class L3Partner:
    """The partner duties of one agent for every level 3 VM it protects."""

    def __init__(self, host: HostContext, addr: str, port: int, key: bytes,
                 paths_for: Callable[[VmSpec], ReplicaPaths], warm: WarmStandbys | None = None) -> None:
        """`warm`: QEMUs started ahead on the replicas (agent/warm.py); None: a takeover
        starts its QEMU then."""
        self.host, self.me, self.paths_for = host, host.me, paths_for
        self.warm = warm if warm is not None else WarmStandbys(None)
        self.store, self.snapshot = host.store, host.latest
        self.history = host.journal.history  # availability records: the outage starts when the primary fell silent
        self.timing, self.event = host.timing, host.journal.event
        self.standbys: dict[str, Standby] = {}
        self.server = StandbyServer(addr, port, key, self._admit, live_within=LIVE_WITHIN_S)
        self._task: asyncio.Task[None] | None = None
        self._taking_over: set[str] = set()
        self._probed: set[str] = set()  # VMs whose silent primary answered a probe (said once)

    async def start(self) -> None:
        await self.server.start()
        self._task = asyncio.create_task(self._watch(), name="l3-partner")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.server.close()
        await self.warm.close()

    def _admit(self, vm: str, peer: str, hello: dict[str, Any]) -> Standby:
        """The Standby a new checkpoint session may feed, or WireError saying why not: this
        host must be the VM's partner, the peer its owner's replication address, and the
        files the sizes the spec gives (a replica is never resized to a peer's liking)."""
        snap = self.snapshot()
        if not valid_name(vm):
            raise WireError("HELLO names no valid VM")
        if snap is None or not is_partner(snap, self.me, vm):
            raise WireError(f"{self.me} is not the partner of VM {vm}")
        if vm in self._taking_over:
            raise WireError(f"{self.me} is taking VM {vm} over")
        view = snap.vms[vm]
        assert view.owner is not None
        owner = snap.hosts.get(view.owner.host)
        if owner is None or peer != owner.replication_addr:
            raise WireError(f"VM {vm} runs on {view.owner.host}, whose replication address is "
                            f"{owner.replication_addr if owner else 'unknown'}, not {peer}")
        files = hello.get("files")
        want = [view.spec.memory_mib << 20] + [d.size for d in view.spec.disks]
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files) or \
                [f.get("size") for f in files] != want:
            raise WireError(f"HELLO file sizes do not match VM {vm}'s spec ({want})")
        session = hello.get("session")
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise WireError("HELLO without a valid session id")
        standby = self.standbys.get(vm)
        if standby is None:
            standby = Standby(vm, self.paths_for(view.spec))
            self.standbys[vm] = standby
        return standby

    async def _watch(self) -> None:
        """Wakes the agent's reconcile loop as soon as a primary falls silent: `decide` then
        proposes the takeover (core/decide.py, `may_take_over`) and the agent carries it out
        (`take_over`), first among the tick's actions."""
        noticed: set[str] = set()
        while True:
            await asyncio.sleep(WATCH_S)
            self.warm.keep(self._warm_wanted())
            for vm, standby in list(self.standbys.items()):
                if standby.committed is not None and standby.silent_for() > self.timing.l3_takeover_after:
                    if vm not in noticed:
                        noticed.add(vm)
                        self.host.wake()
                else:
                    noticed.discard(vm)
                    self._probed.discard(vm)

    def _warm_wanted(self) -> dict[str, tuple[VmSpec, str]]:
        """The VMs whose replica here has held committed checkpoints of a live session for
        `WARM_AFTER_S`: each gets a QEMU started ahead (agent/warm.py). Not at once: a
        session's first seconds are the busiest on both hosts (pre-copy, often a booting
        guest), and starting a QEMU then adds to them."""
        snap = self.snapshot()
        if snap is None:
            return {}
        now = time.monotonic()
        return {vm: (snap.vms[vm].spec, s.committed.session) for vm, s in self.standbys.items()
                if s.committed is not None and (s.connected or self._may_take_over(snap, vm))
                and s.protected_at is not None and now - s.protected_at >= WARM_AFTER_S
                and is_partner(snap, self.me, vm)}

    def _may_take_over(self, snap: PoolSnapshot, vm: str) -> bool:
        """The session's link closed, but this copy is still recorded current: the primary
        may be gone (a primary whose agent ended closes the link at once, before any
        takeover), so its QEMU started ahead is kept for the takeover."""
        copies = snap.vms[vm].copies
        mine = copies.state_of(self.me) if copies is not None else None
        return mine is not None and mine.state is CopyState.CURRENT

    def local_standbys(self) -> dict[str, LocalStandby]:
        """What `decide` needs to know of the replicas kept here (none being taken over now)."""
        return {vm: LocalStandby(vm, s.committed.epoch if s.committed else None, s.silent_for())
                for vm, s in self.standbys.items() if vm not in self._taking_over}

    async def take_over(self, vm: str) -> None:
        """Carry out a TAKE_OVER decision: freeze the standby, end the old owner's ownership
        in one transaction (it fails if the primary recorded this copy outdated first), claim."""
        standby = self.standbys.get(vm)
        if standby is None or vm in self._taking_over:
            return
        self._taking_over.add(vm)
        try:
            await self._take_over(vm, standby)
        except EtcdError as e:
            log.warning("%s: takeover attempt failed: %s", vm, e)
            standby.thaw()
        finally:
            self._taking_over.discard(vm)

    async def _take_over(self, vm: str, standby: Standby) -> None:
        silent = standby.silent_for()
        if silent < PROBE_UNTIL_S and await self._primary_listens(vm):
            if vm not in self._probed:
                self._probed.add(vm)
                self.event(vm, "no-takeover", f"primary silent for {silent:.2f}s but its agent still accepts "
                                              f"connections: waiting (up to {PROBE_UNTIL_S:g}s of silence)")
            return
        self._probed.discard(vm)
        held = await standby.freeze()
        snap = await self.store.snapshot()
        view = snap.vms.get(vm)
        mine = view.copies.state_of(self.me) if view and view.copies else None
        if held is None or view is None or view.owner is None or view.owner.host == self.me \
                or mine is None or mine.state is not CopyState.CURRENT or view.copies is None \
                or view.spec.desired is not Desired.RUNNING:
            standby.committed = None  # nothing here to take over from; wait for a new session
            standby.thaw()
            return
        new: Copies = take_over(view.copies, self.me, time.time())
        if not await self.store.take_over(vm, view.owner.token, view.copies, new):
            standby.committed = None  # the primary recorded us outdated first: it keeps the VM
            standby.thaw()
            self.event(vm, "no-takeover", f"{view.owner.host} silent for {silent:.2f}s but it recorded this "
                                       "replica outdated first: it keeps the VM")
            return
        self.warm.reserve(vm)  # its start comes with the claim
        del self.standbys[vm]
        self.history(vm, "down", f"{view.owner.host} lost (silent {silent:.2f}s)", at=time.time() - silent,
                     host=view.owner.host)
        self.event(vm, "takeover", f"{view.owner.host} silent for {silent:.2f}s on the checkpoint link: "
                                   f"ended its ownership; resuming from checkpoint {held[1]} here")
        token = await self.store.claim(vm, self.me, self.host.lease, None, None)
        if token is not None:
            self.host.wake()

    async def _primary_listens(self, vm: str) -> bool:
        """Whether the VM's primary host still accepts a connection on its checkpoint port
        over the A-links: its agent lives, only its event loop stalled (a loaded host; seen as
        a takeover of a healthy primary that fell silent for 0.31 s). A host that lost power,
        a cut link (unreachable) or a dead agent (refused) answers no: take over."""
        snap = self.snapshot()
        view = snap.vms.get(vm) if snap else None
        owner = snap.hosts.get(view.owner.host) if snap and view and view.owner else None
        if owner is None or not owner.replication_addr:
            return False
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(owner.replication_addr, self.server.port), PROBE_S)
        except (OSError, TimeoutError):
            return False
        writer.close()  # (nothing sent: the standby server takes it for a probe)
        return True

    def holds_checkpoint(self, vm: str) -> bool:
        standby = self.standbys.get(vm)
        return standby is not None and standby.committed is not None

    def drop(self, vm: str) -> None:
        """This host now runs the VM itself: its replica files are its own."""
        standby = self.standbys.pop(vm, None)
        if standby is not None:
            standby.release_files()
