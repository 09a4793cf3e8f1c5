"""A deterministic simulation of the control plane: the real decision core (`decide`,
`claim_plan`, the copy rules) and the real store code (store/pool.py) on the in-memory etcd
(sim/memetcd.py), driven by simulated agents on a simulated clock through random fault
schedules, with the campaign's invariants checked after every step.

What each simulated agent does is what the real one does at the store: renew its lease and
fence its VMs before the lease can expire (agent/fence.py), then tick: a snapshot, `decide`,
and each decision carried out with the same store calls (claim, release, copies records,
status). A level 2 primary mirrors every write to each copy recorded current, and records a
copy it cannot reach outdated (under its token) before it acknowledges a write that copy
lacks (core/replication.py); a partner exporting its copy is resynced, then recorded
current. QEMU, disks and links are modelled: a VM runs on a host, a copy is a number (the
writes it holds), a link is up or down.

Faults, drawn from the seed: a host's power lost and restored, a host cut from etcd and
back, an A-link pair down and up, and any etcd request dropped before it is applied or its
answer lost after (the client cannot tell which). Each schedule interleaves the hosts' steps
(a snapshot read, each decision carried out, a renewal, a write) in a random order, so a
decision may act on a snapshot another host has already made stale.

Invariants (a violation names the step, the seed and what was seen):
  * never two copies: at no instant does a VM run on two hosts;
  * nothing acknowledged lost: a host starts a level 2 VM only from a copy holding every
    acknowledged write; a level 1 VM's shared disk holds them by construction;
  * no stale copy promoted: a copy recorded current holds every acknowledged write;
  * progress: with every fault healed, every VM runs again, protected, within a bound.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from ..core.decide import Action, Decision, decide
from ..core.model import (Desired, DiskSpec, HostInfo, Level, LocalStandby, LocalView, LocalVm, NicSpec, PoolSnapshot,
                          RunState, VmSpec, VmStatus)
from ..core.placement import claim_plan
from ..core.replication import Copies, CopyState, mark, replace_partner, take_over
from ..core.timing import Timing
from ..store.etcd import EtcdError
from ..store.etcd import EtcdUnavailable
from ..store.pool import PoolStore, parse_snapshot
from .memetcd import MemEtcd, SimEtcdClient

SHARED = "/shared"
LEASE_TTL = 10.0      # seconds (the lab's timing)
FENCE_MARGIN = 2.0    # the fence guard kills this long before the lease could expire
RENEW_EVERY = 2.0
# Every VM runs again, protected (level 2: both copies current), within this of the last
# fault healed: a lease to expire (10 s), a claim and start, an export and a resync, with
# the agents' ticks interleaved at random (docs/architecture.md, "The simulator").
RECOVERY_BOUND_S = 60.0
OUTDATE_AT_START = True  # (agent/starts.py `_outdate_other_copies`; a test turns it off to show it matters)


class SimPoolStore(PoolStore):
    """The real store; a snapshot read at a revision already parsed is not parsed again
    (the parse is pure, and the snapshot immutable: the simulator's time goes to the logic,
    not to reading the same records over and over)."""

    def __init__(self, etcd: SimEtcdClient, pool: str, parsed: dict[int, PoolSnapshot]) -> None:
        super().__init__(etcd, pool)
        self.parsed = parsed

    async def snapshot(self) -> PoolSnapshot:
        etcd = self.etcd
        assert isinstance(etcd, SimEtcdClient)
        etcd.model.expire_leases()
        got = self.parsed.get(etcd.model.revision)
        if got is not None:
            if etcd.fault("/v3/kv/range"):
                raise EtcdUnavailable("no etcd endpoint answered (sim: range dropped)")
            return got
        kvs, revision = await etcd.get_prefix(self.state)  # (the real request, faults and all)
        got = parse_snapshot(self.state, kvs, revision, self._parsed)
        self.parsed.clear()
        self.parsed[revision] = got
        return got


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@dataclass
class LocalRec:
    state: RunState
    token: int
    exit_code: int | None = None


@dataclass
class Violation:
    step: int
    at: float
    what: str


@dataclass
class SimStandby:
    """A level 3 replica on the partner (l3/standby.py): the writes of its last committed
    checkpoint, and when the primary was last heard on the checkpoint link."""
    data: int
    heard_at: float
    frozen: bool = False  # a takeover began: nothing more is applied


@dataclass
class SimHost:
    name: str
    store: PoolStore
    up: bool = True
    cut: bool = False                 # cut from etcd (its requests never arrive)
    lease: int = 0
    fence_deadline: float = 0.0       # VMs may run until then (clock)
    renewed_at: float = -1e9
    local: dict[str, LocalRec] = field(default_factory=dict)
    exports: set[str] = field(default_factory=set)
    disks: dict[str, int] = field(default_factory=dict)  # vm -> writes its copy holds (level 2-3)
    standbys: dict[str, SimStandby] = field(default_factory=dict)  # level 3 replicas kept here
    paused: set[str] = field(default_factory=set)       # level 3 guests stopped, their partner lost
    unprotected: set[str] = field(default_factory=set)  # level 3 VMs whose partner it recorded outdated
    plan: list[Decision] = field(default_factory=list)
    plan_snapshot: PoolSnapshot | None = None
    restarting: bool = False          # its agent died; the next one has not taken the lease back yet
    mirrored: dict[str, set[str]] = field(default_factory=dict)  # level 2 vm -> partners its QEMU writes to


@dataclass
class Outcome:
    seed: int
    steps: int
    faults: dict[str, int]
    writes_acked: int
    violations: list[Violation]
    recovery_s: float | None     # simulated seconds from the last fault healed to every VM protected
    schedule: list[str]
    trace: list[str]

    @property
    def recovered(self) -> bool:
        return self.recovery_s is not None and self.recovery_s <= RECOVERY_BOUND_S

    @property
    def ok(self) -> bool:
        return not self.violations and self.recovered


class World:
    def __init__(self, seed: int, hosts: int = 3, vms: tuple[Level, ...] = (Level.RESTART, Level.COMPONENT,
                                                                            Level.SYSTEM),
                 fault_rate: float = 0.02, request_fault_rate: float = 0.01) -> None:
        self.seed, self.rng = seed, random.Random(seed)
        self.clock = Clock()
        self.etcd = MemEtcd(self.clock.time)
        self.timing = Timing()
        self.fault_rate, self.request_fault_rate = fault_rate, request_fault_rate
        names = [f"h{i + 1}" for i in range(hosts)]
        self.parsed: dict[int, PoolSnapshot] = {}
        self.hosts = {n: SimHost(n, SimPoolStore(SimEtcdClient(self.etcd, self._fault_for(n)), "sim", self.parsed))
                      for n in names}
        self.admin = SimPoolStore(SimEtcdClient(self.etcd), "sim", self.parsed)  # (the checks' reads, faultless)
        self.specs = [self._spec(f"vm{i}", level) for i, level in enumerate(vms)]
        self.shared: dict[str, int] = {}      # level 1 disks on shared storage: writes held
        self.acked: dict[str, int] = {}       # writes acknowledged to the guest's clients
        self.pending: dict[tuple[str, str], int] = {}  # (host, vm) -> writes done there, not yet acknowledged
        self.links_down: set[frozenset[str]] = set()
        self.violations: list[Violation] = []
        self.faults: dict[str, int] = {}
        self.schedule: list[str] = []
        self.trace: list[str] = []        # what each host did, step by step (printed for a failing seed)
        self.step_no = 0

    # --- setup --------------------------------------------------------------------------
    def _spec(self, name: str, level: Level) -> VmSpec:
        disk = DiskSpec(f"{SHARED}/{name}.img") if level is Level.RESTART else DiskSpec(size=64 << 20)
        return VmSpec(name, level, 256, 1, (disk,), (NicSpec(f"52:54:00:00:00:{len(name):02x}"),),
                      desired=Desired.RUNNING)

    def _fault_for(self, host: str):  # type: ignore[no-untyped-def]
        def fault(path: str) -> str:
            h = self.hosts[host]
            if h.cut or not h.up:
                return "drop"
            r = self.rng.random()
            if r < self.request_fault_rate / 2:
                return "drop"
            if r < self.request_fault_rate:
                return "lose"
            return ""
        return fault

    async def setup(self) -> None:
        for h in self.hosts.values():
            await self._join(h)
        for spec in self.specs:
            assert await self.admin.define_vm(spec)
            self.acked[spec.name] = 0
            self.shared[spec.name] = 0

    async def _join(self, h: SimHost) -> None:
        """A host (re)starting its agent: a new lease, its record; nothing runs yet."""
        try:
            h.lease, _ = await h.store.etcd.lease_grant(LEASE_TTL)
            ok = await h.store.register_host(HostInfo(h.name, 8192, 8, (SHARED,), h.lease, f"10.0.0.{h.name[1:]}"),
                                             h.lease)
        except EtcdError:
            h.lease = 0
            return
        self.note(h, f"joined: lease {h.lease:x} {'ok' if ok else 'name taken'}")
        if ok:
            h.renewed_at = self.clock.now
            h.fence_deadline = self.clock.now + LEASE_TTL - FENCE_MARGIN
        else:
            h.lease = 0

    # --- one step -------------------------------------------------------------------------
    async def step(self) -> None:
        self.step_no += 1
        self.clock.now += self.rng.uniform(0.05, 0.6)
        if self.rng.random() < self.fault_rate:
            self._inject()
        h = self.rng.choice(list(self.hosts.values()))
        if h.up:
            await self._host_step(h)
        self._check()

    def _inject(self) -> None:
        kind = self.rng.choice(["power", "cut", "link", "restart", "crash", "heal"])
        h = self.rng.choice(list(self.hosts.values()))
        if kind == "crash":  # one QEMU here dies on its own (the crash policy starts it again here)
            running = sorted(vm for vm in h.local if self._running_here(h, vm) is not None)
            if running:
                vm = self.rng.choice(running)
                h.local[vm].state, h.local[vm].exit_code = RunState.CRASHED, -11
                self.pending.pop((h.name, vm), None)
                h.paused.discard(vm)
                self.note(h, f"{vm}'s QEMU crashed")
        elif kind == "restart":
            if h.up and h.lease and not h.restarting:
                self._agent_dies(h)
        elif kind == "power":
            if h.up:
                h.up, h.restarting = False, False  # its VMs die with it; its disks keep what they hold
                h.local.clear()
                h.exports.clear()
                h.standbys.clear()  # (a replica in tmpfs: gone with the power)
                h.paused.clear()
                h.unprotected.clear()
                h.plan = []
                for key in [k for k in self.pending if k[0] == h.name]:
                    del self.pending[key]
            else:
                h.up = True
                h.lease = 0  # (joins at its next step)
        elif kind == "cut":
            h.cut = not h.cut
        elif kind == "link":
            other = self.rng.choice([x for x in self.hosts if x != h.name])
            self.links_down ^= {frozenset((h.name, other))}
        else:
            kind = "heal"
            for x in self.hosts.values():
                x.cut = False
                if not x.up:
                    x.up, x.lease = True, 0
            self.links_down.clear()
        self.faults[kind] = self.faults.get(kind, 0) + 1
        self.schedule.append(f"{self.step_no}: {kind} {h.name}")

    def reachable(self, a: str, b: str) -> bool:
        return self.hosts[a].up and self.hosts[b].up and frozenset((a, b)) not in self.links_down

    def _agent_dies(self, h: SimHost) -> None:
        """The agent process ends (qemu/keeper.py): its plans, its level 3 standbys and its
        copy servers with it; a level 3 QEMU dies with it too (its NICs went through the
        agent); levels 1-2 QEMUs run on under their keepers, fenced by the last deadline."""
        h.restarting = True
        h.plan = []
        h.exports.clear()
        h.standbys.clear()
        for vm in list(h.local):
            if self.spec_of(vm).level is Level.SYSTEM:
                del h.local[vm]
                self.pending.pop((h.name, vm), None)
                h.paused.discard(vm)
                h.unprotected.discard(vm)
        self.note(h, "agent died; kept: " + ", ".join(sorted(h.local)))

    async def _resume(self, h: SimHost) -> None:
        """The next agent (agent/lease.py, agent/adoption.py): renews the lease etcd still
        holds and adopts each kept VM it still owns under its token (the others are killed);
        a lease etcd dropped ends every kept VM (the deadline file names the new lease)."""
        sent = self.clock.now
        try:
            ttl = await h.store.etcd.lease_keepalive(h.lease)
            snap = await h.store.snapshot()
        except EtcdError:
            return  # (it tries again; the keepers hold the old deadline meanwhile)
        if ttl <= 0:
            for rec in h.local.values():
                rec.state, rec.exit_code = RunState.STOPPED, -9
            h.local.clear()
            h.restarting, h.lease = False, 0
            self.note(h, "new agent: the lease was gone, every kept VM ended")
            return
        h.renewed_at = sent
        h.fence_deadline = max(h.fence_deadline, sent + ttl - FENCE_MARGIN)
        for vm, rec in list(h.local.items()):
            view = snap.vms.get(vm)
            if rec.state is not RunState.RUNNING or view is None or view.owner is None \
                    or (view.owner.host, view.owner.token) != (h.name, rec.token):
                del h.local[vm]
                self.pending.pop((h.name, vm), None)
        h.restarting = False
        self.note(h, "new agent: lease kept, adopted " + ", ".join(sorted(h.local)))

    async def _host_step(self, h: SimHost) -> None:
        """One of the host's activities, in a random order: lease renewal (with the fence
        guard), a tick's snapshot and decisions, one decision carried out, a guest write."""
        if h.restarting:
            self._fence_if_due(h)  # (the keepers: whether or not an agent runs)
            if self.rng.random() < 0.5:
                await self._resume(h)
            else:
                await self._write_unattended(h)
            return
        if not h.lease:
            await self._join(h)
            return
        if self.clock.now - h.renewed_at > self.rng.uniform(0.5, RENEW_EVERY):  # (its own task: as due)
            await self._renew(h)
            if not h.lease:
                return
        self._fence_if_due(h)
        if h.plan:
            d = h.plan.pop(0)
            assert h.plan_snapshot is not None
            await self._execute(h, d, h.plan_snapshot)
        elif self.rng.random() < 0.5:
            await self._tick(h)
        else:
            await self._replicate_and_write(h)

    def _fence_if_due(self, h: SimHost) -> None:
        if self.clock.now >= h.fence_deadline:
            for name, rec in h.local.items():
                if rec.state in (RunState.STARTING, RunState.RUNNING):
                    # (an exit nobody asked for, as the agent's process watcher records it: if
                    # the lease was renewed in time after all, the VM starts again here)
                    rec.state, rec.exit_code = RunState.CRASHED, -9
                    self.note(h, f"fence: {name} killed")
            for key in [k for k in self.pending if k[0] == h.name]:
                del self.pending[key]

    async def _renew(self, h: SimHost) -> None:
        sent = self.clock.now
        try:
            ttl = await h.store.etcd.lease_keepalive(h.lease)
        except EtcdError:
            return
        if ttl <= 0:  # the lease is gone: everything here stops, and the agent joins again
            h.fence_deadline = 0.0
            self._fence_if_due(h)
            h.lease = 0
            return
        h.renewed_at = sent
        h.fence_deadline = max(h.fence_deadline, sent + ttl - FENCE_MARGIN)
        self.note(h, f"lease renewed: run until t={h.fence_deadline - 1_000_000:.2f}")

    async def _tick(self, h: SimHost) -> None:
        try:
            snap = await h.store.snapshot()
        except EtcdError:
            return
        for name, rec in list(h.local.items()):  # (status, as the agent reports it)
            view = snap.vms.get(name)
            if view is not None and view.owner is not None and view.owner.host == h.name:
                status = VmStatus(h.name, rec.state, rec.token, 0.0)
                if view.status != status:
                    try:
                        await h.store.report_status(name, status, h.lease)
                    except EtcdError:
                        pass
        self._hear(h, snap)
        standbys = {vm: LocalStandby(vm, st.data, self.clock.now - st.heard_at)
                    for vm, st in h.standbys.items() if not st.frozen}
        local = LocalView(h.name, {n: LocalVm(n, r.state, r.token, r.exit_code) for n, r in h.local.items()},
                          frozenset(h.exports), standbys, now=self.clock.now)
        report = decide(snap, local, self.timing.partner_replace_after, self.timing.l3_takeover_after,
                        self.timing.dr_confirm)
        urgent = (Action.KILL, Action.TAKE_OVER)
        h.plan = sorted(report.actions(), key=lambda d: d.action not in urgent)
        h.plan_snapshot = snap

    def note(self, h: SimHost, what: str) -> None:
        self.trace.append(f"{self.step_no} t={self.clock.now - 1_000_000:.2f} {h.name}: {what}")

    async def _execute(self, h: SimHost, d: Decision, snap: PoolSnapshot) -> None:
        """What the agent's handler for `d.action` does at the store (agent/agent.py)."""
        rec = h.local.get(d.vm)
        self.note(h, f"{d} (snapshot rev {snap.revision})")
        try:
            if d.action is Action.KILL:
                if rec is not None:
                    rec.state, rec.exit_code = RunState.STOPPED, -9
                self.pending.pop((h.name, d.vm), None)
            elif d.action is Action.CLAIM:
                if self.clock.now < h.fence_deadline:
                    view = snap.vms[d.vm]
                    token = await h.store.claim(d.vm, h.name, h.lease, view.copies,
                                                claim_plan(snap, view, h.name, self.clock.now))
                    self.note(h, f"claim of {d.vm}: token {token}")
            elif d.action is Action.START:
                assert d.token is not None
                # (agent/starts.py: the start is recorded only while this host owns the VM
                # under the token; a plan made before the lease was lost fails here)
                starting = VmStatus(h.name, RunState.STARTING, d.token, self.clock.now, d.reason)
                if self.clock.now < h.fence_deadline and await h.store.report_status(d.vm, starting, h.lease):
                    if self.spec_of(d.vm).level.has_copies and OUTDATE_AT_START:
                        # (agent/starts.py: no other copy stays recorded current once the guest runs
                        # here: level 2 starts on its own copy alone, until a resync)
                        await h.store.update_copies(d.vm, d.token, lambda c: self._others_outdated(c, h.name))
                    self._starting(h, d.vm, snap)
                    h.local[d.vm] = LocalRec(RunState.RUNNING, d.token)
                    h.mirrored[d.vm] = set()
                    self.note(h, f"{d.vm} runs (token {d.token})")
            elif d.action is Action.STOP:
                if rec is not None:
                    rec.state, rec.exit_code = RunState.STOPPED, 0
            elif d.action is Action.RELEASE:
                assert d.token is not None
                if await h.store.release(d.vm, d.token):
                    h.local.pop(d.vm, None)
            elif d.action is Action.EXPORT:
                h.exports.add(d.vm)
            elif d.action is Action.UNEXPORT:
                h.exports.discard(d.vm)
            elif d.action is Action.TAKE_OVER:
                await self._take_over(h, d.vm)
            elif d.action is Action.REPLACE_PARTNER:
                view = snap.vms[d.vm]
                if view.copies is not None and d.token is not None and d.target is not None:
                    new = replace_partner(view.copies, view.copies.partner_of(h.name), d.target, self.clock.now)
                    await h.store.set_copies(d.vm, d.token, view.copies, new)
        except EtcdError:
            pass

    def _others_outdated(self, c: Copies, me: str) -> Copies | None:
        others = [x for x, copy in c.copies.items() if x != me and copy.state is CopyState.CURRENT]
        for x in others:
            c = mark(c, x, CopyState.OUTDATED, f"VM (re)started on {me}", self.clock.now, full=True)
        return c if others else None

    # --- guests and level 2 replication -------------------------------------------------
    def _starting(self, h: SimHost, vm: str, snap: PoolSnapshot) -> None:
        spec = snap.vms[vm].spec
        h.paused.discard(vm)
        h.unprotected.discard(vm)
        if spec.level in (Level.COMPONENT, Level.SYSTEM):
            held = h.disks.get(vm, 0)
            if held < self.acked[vm]:
                self._violate(f"{vm} started on {h.name} from a copy holding {held} writes; "
                              f"{self.acked[vm]} were acknowledged")

    def _running_here(self, h: SimHost, vm: str) -> int | None:
        rec = h.local.get(vm)
        if rec is None or rec.state is not RunState.RUNNING or self.clock.now >= h.fence_deadline:
            return None
        return rec.token

    def _visible(self, h: SimHost, vm: str) -> bool:
        """Whether a copy running here can acknowledge anything. A level 3 guest's output waits
        for its partner's ACK (output commit): one whose partner is lost, or took the VM over,
        executes unseen until it is paused or killed, so only one that may release counts."""
        if self._running_here(h, vm) is None or vm in h.paused:
            return False
        if self.spec_of(vm).level is not Level.SYSTEM or vm in h.unprotected:
            return True
        return any(self._feeds(h, p, vm) for p in self.hosts if p != h.name)

    def _feeds(self, primary: SimHost, partner: str, vm: str) -> bool:
        st = self.hosts[partner].standbys.get(vm)
        return st is not None and not st.frozen and self.reachable(primary.name, partner)

    def spec_of(self, vm: str) -> VmSpec:
        return next(s for s in self.specs if s.name == vm)

    def _hear(self, h: SimHost, snap: PoolSnapshot) -> None:
        """The partner's side of the checkpoint link: the primary's heartbeats (every 25 ms)
        arrive while its agent lives and a path is up; a replica of a VM this host no longer
        keeps goes."""
        for vm in list(h.standbys):
            view = snap.vms.get(vm)
            if view is None or view.owner is None or view.copies is None or h.name not in view.copies.copies:
                del h.standbys[vm]
                continue
            primary = self.hosts[view.owner.host]
            if primary.up and self._running_here(primary, vm) is not None and self.reachable(primary.name, h.name):
                h.standbys[vm].heard_at = self.clock.now

    async def _take_over(self, h: SimHost, vm: str) -> None:
        """agent/l3.py L3Partner._take_over: freeze, end the old ownership in one transaction
        (it fails if the primary recorded this copy outdated first), claim."""
        st = h.standbys.get(vm)
        if st is None:
            return
        st.frozen = True
        try:
            await self._take_over_frozen(h, vm, st)
        except EtcdError:
            st.frozen = False  # (as the agent does: thawed, the primary may feed it again)

    async def _take_over_frozen(self, h: SimHost, vm: str, st: SimStandby) -> None:
        snap = await h.store.snapshot()
        view = snap.vms.get(vm)
        mine = view.copies.state_of(h.name) if view is not None and view.copies is not None else None
        if (view is None or view.owner is None or view.owner.host == h.name or view.copies is None
                or mine is None or mine.state is not CopyState.CURRENT or view.spec.desired is not Desired.RUNNING):
            del h.standbys[vm]
            return
        new = take_over(view.copies, h.name, self.clock.now)
        if not await h.store.take_over(vm, view.owner.token, view.copies, new):
            del h.standbys[vm]  # (the primary recorded it outdated first: it keeps the VM)
            return
        h.disks[vm] = st.data
        del h.standbys[vm]
        self.note(h, f"took {vm} over from {view.owner.host} (checkpoint of {st.data} writes)")
        token = await h.store.claim(vm, h.name, h.lease, None, None)
        self.note(h, f"claim of {vm} after the takeover: token {token}")

    async def _replicate_and_write(self, h: SimHost) -> None:
        """For every VM running here: its replication duties, then one guest write. (Every
        VM, not one drawn: the agent runs each VM's replication loop on its own, so a VM's
        resync or lost partner is never left waiting for its turn; drawing one left a
        resync undone for 50 s in 1 schedule of 10^5.)"""
        for vm in [vm for vm in h.local if self._running_here(h, vm) is not None]:
            token = self._running_here(h, vm)
            if token is not None:  # (an earlier VM's duties may have ended this one: a takeover)
                await self._replicate_and_write_one(h, vm, token)

    async def _replicate_and_write_one(self, h: SimHost, vm: str, token: int) -> None:
        spec = self.spec_of(vm)
        if spec.level is Level.RESTART:
            self.shared[vm] += 1
            self.acked[vm] = self.shared[vm]
            return
        if spec.level is Level.SYSTEM:
            await self._checkpoint_and_write(h, vm, token)
            return
        copies = await self._owned_copies(h, vm, token)
        if copies is None:
            return
        # a partner serving its outdated copy is resynced, then recorded current
        for p, c in copies.copies.items():
            if p != h.name and c.state is CopyState.OUTDATED and vm in self.hosts[p].exports \
                    and self.reachable(h.name, p):
                self.hosts[p].disks[vm] = h.disks.get(vm, 0)
                h.mirrored.setdefault(vm, set()).add(p)  # (its last pass, then MIRRORED)
                new = mark(copies, p, CopyState.CURRENT, "resynced", self.clock.now)
                try:
                    got = await h.store.set_copies(vm, token, copies, new)
                except EtcdError:
                    return
                if got is None:
                    return
                copies = got
        # one write: done here, mirrored to every partner the QEMU's graph holds (its block
        # graph: those resynced since it started), acknowledged only once every current copy
        # it mirrors to and cannot reach is recorded outdated (then dropped from the graph)
        h.disks[vm] = h.disks.get(vm, 0) + 1
        self.pending[(h.name, vm)] = h.disks[vm]
        mirrored = h.mirrored.setdefault(vm, set())
        for p, c in copies.copies.items():
            if p == h.name or c.state is not CopyState.CURRENT or p not in mirrored:
                continue
            if self._serves(h, p, vm):
                self.hosts[p].disks[vm] = h.disks[vm]
                continue
            new = mark(copies, p, CopyState.OUTDATED, "partner unreachable", self.clock.now)
            try:
                got = await h.store.set_copies(vm, token, copies, new)
            except EtcdError:
                return  # (not acknowledged: the guest waits; the fence ends it if this lasts)
            if got is None:
                return
            mirrored.discard(p)  # (dropped from the graph once the record is committed)
            copies = got
        if self._running_here(h, vm) == token:
            self.acked[vm] = max(self.acked[vm], self.pending.pop((h.name, vm)))

    async def _write_unattended(self, h: SimHost) -> None:
        """A guest write while no agent runs here: QEMU goes on alone. Level 1: to the shared
        disk. Level 2: to every copy the last record called current, through their copy
        servers; one it cannot reach fails the write, and the guest waits (werror=stop)
        for the next agent."""
        running = [vm for vm in h.local if self._running_here(h, vm) is not None]
        if not running:
            return
        vm = self.rng.choice(running)
        if self.spec_of(vm).level is Level.RESTART:
            self.shared[vm] += 1
            self.acked[vm] = self.shared[vm]
            return
        try:
            snap = await self.admin.snapshot()  # (what the record says; the QEMU's graph follows it)
        except EtcdError:
            return
        view = snap.vms.get(vm)
        if view is None or view.copies is None:
            return
        partners = [p for p, c in view.copies.copies.items()
                    if p != h.name and c.state is CopyState.CURRENT and p in h.mirrored.get(vm, set())]
        if not all(self._serves(h, p, vm) for p in partners):
            return
        h.disks[vm] = h.disks.get(vm, 0) + 1
        for p in partners:
            self.hosts[p].disks[vm] = h.disks[vm]
        self.acked[vm] = max(self.acked[vm], h.disks[vm])

    def _serves(self, primary: SimHost, partner: str, vm: str) -> bool:
        """The partner's copy server takes the primary's writes (it runs while its agent does)."""
        return self.reachable(primary.name, partner) and vm in self.hosts[partner].exports

    async def _owned_copies(self, h: SimHost, vm: str, token: int) -> Copies | None:
        """The VM's copies record, while `h` still owns it under `token` (None: unreadable, or not)."""
        try:
            snap = await h.store.snapshot()
        except EtcdError:
            return None
        view = snap.vms.get(vm)
        if view is None or view.owner is None or view.owner.token != token:
            return None
        return view.copies

    async def _checkpoint_and_write(self, h: SimHost, vm: str, token: int) -> None:
        """Level 3 primary (agent/l3.py): a partner whose copy is outdated gets a full copy and
        is recorded current; each write is released once the partner acknowledged the
        checkpoint holding it; a partner lost is recorded outdated (the guest stopped
        meanwhile) before anything more is released; losing that race to a takeover kills
        this copy."""
        copies = await self._owned_copies(h, vm, token)
        if copies is None:
            return
        partner = copies.partner_of(h.name)
        state = copies.state_of(partner) if partner else None
        if partner is not None and state is not None and state.state is not CopyState.CURRENT \
                and self.reachable(h.name, partner) and not self.hosts[partner].restarting and vm not in h.paused:
            p = self.hosts[partner]
            if vm not in p.standbys or not p.standbys[vm].frozen:
                p.standbys[vm] = SimStandby(h.disks.get(vm, 0), self.clock.now)  # (pre-copy, checkpoint 1)
                p.disks[vm] = h.disks.get(vm, 0)  # (the replica's disk files: what a start there uses)
                try:
                    got = await h.store.set_copies(vm, token, copies, mark(copies, partner, CopyState.CURRENT,
                                                                           "checkpoint acknowledged", self.clock.now))
                except EtcdError:
                    # agent/l3.py: a failed record ends the session as a lost partner does (it may
                    # have been applied, its answer lost): the guest stopped, output held until the
                    # copy is recorded outdated
                    h.paused.add(vm)
                    return
                if got is None:
                    return
                copies = got
                h.unprotected.discard(vm)
        current = partner is not None and copies.state_of(partner) is not None \
            and copies.state_of(partner).state is CopyState.CURRENT  # type: ignore[union-attr]
        if vm in h.paused and not current:  # (its record went through, the answer was lost)
            h.paused.discard(vm)
            h.unprotected.add(vm)
        if current and partner is not None and (not self._feeds(h, partner, vm) or vm in h.paused):
            h.paused.add(vm)  # the partner is lost: output held, guest stopped, until recorded
            try:
                got = await h.store.set_copies(vm, token, copies, mark(copies, partner, CopyState.OUTDATED,
                                                                       "partner lost", self.clock.now))
            except EtcdError:
                return
            if got is None:  # (it took the VM over first: this copy is killed, its output discarded)
                rec = h.local.get(vm)
                if rec is not None:
                    rec.state, rec.exit_code = RunState.STOPPED, -9
                self.pending.pop((h.name, vm), None)
                self.note(h, f"{vm}: lost the race to {partner}'s takeover: killed")
                return
            h.paused.discard(vm)
            h.unprotected.add(vm)
            copies, current = got, False
        if vm in h.paused:
            return
        h.disks[vm] = h.disks.get(vm, 0) + 1
        if current and partner is not None:
            self.hosts[partner].standbys[vm].data = h.disks[vm]  # (checkpoint, acknowledged)
            self.hosts[partner].disks[vm] = h.disks[vm]
        self.acked[vm] = max(self.acked[vm], h.disks[vm])

    # --- invariants ---------------------------------------------------------------------
    def _violate(self, what: str) -> None:
        self.violations.append(Violation(self.step_no, self.clock.now, what))

    def _check(self) -> None:
        for spec in self.specs:
            on = [h.name for h in self.hosts.values() if h.up and self._visible(h, spec.name)]
            if len(on) > 1:
                self._violate(f"{spec.name} runs on {', '.join(on)}")

    async def check_copies(self) -> None:
        """No copy recorded current lacks an acknowledged write (read from the store)."""
        snap = await self.admin.snapshot()
        for spec in self.specs:
            view = snap.vms.get(spec.name)
            if spec.level is Level.RESTART or view is None or view.copies is None:
                continue
            for host in view.copies.current_hosts():
                h = self.hosts[host]
                on_owner = view.owner is not None and view.owner.host == host
                st = h.standbys.get(spec.name)
                if spec.level is Level.SYSTEM and not on_owner:
                    if st is None:
                        continue  # (its replica is gone with its power: the record outlives it until the owner sees)
                    held = st.data
                else:
                    held = h.disks.get(spec.name, 0)
                if held < self.acked[spec.name]:
                    self._violate(f"{spec.name}'s copy on {host} is recorded current with {held} writes; "
                                  f"{self.acked[spec.name]} were acknowledged")

    async def all_protected(self) -> bool:
        snap = await self.admin.snapshot()
        for spec in self.specs:
            view = snap.vms.get(spec.name)
            if view is None or view.owner is None:
                return False
            if self._running_here(self.hosts[view.owner.host], spec.name) is None:
                return False
            if spec.level is not Level.RESTART and (view.copies is None or len(view.copies.current_hosts()) < 2):
                return False
        return True


@contextmanager
def simulated_time(clock: Clock) -> Iterator[None]:
    """The code under test reads the wall clock in places (records' timestamps): it reads
    the simulator's."""
    with mock.patch("time.time", clock.time):
        yield


async def run_schedule(seed: int, steps: int = 300, **kw: Any) -> Outcome:
    """One random schedule: `steps` steps with faults, then every fault healed and the pool
    watched until every VM is protected (at most RECOVERY_BOUND_S, simulated)."""
    world = World(seed, **kw)
    with simulated_time(world.clock):
        await world.setup()
        for _ in range(steps):
            await world.step()
            if world.step_no % 25 == 0:
                await world.check_copies()
        for h in world.hosts.values():
            h.cut = False
            if not h.up:
                h.up, h.lease = True, 0
        world.links_down.clear()
        world.fault_rate = world.request_fault_rate = 0.0
        world.schedule.append(f"{world.step_no}: heal all (recovery)")
        healed_at, recovery = world.clock.now, None
        while world.clock.now - healed_at <= RECOVERY_BOUND_S:
            await world.step()
            if world.step_no % 5 == 0:
                await world.check_copies()
                if await world.all_protected():
                    recovery = world.clock.now - healed_at
                    break
        await world.check_copies()
    return Outcome(seed, world.step_no, dict(world.faults), sum(world.acked.values()), world.violations,
                   recovery, world.schedule, world.trace)


def run(seed: int, **kw: Any) -> Outcome:
    return asyncio.run(run_schedule(seed, **kw))
