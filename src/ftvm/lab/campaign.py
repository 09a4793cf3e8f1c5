"""`ftvm lab campaign --seed S --cycles N [--levels 1,2,3]`: random fault schedules against a
lab pool of 3 hosts with a ledger client writing to a VM at each level, every invariant
checked after every cycle (in the manner of Pacemaker's CTS).

One cycle: a fault drawn from the seed (sometimes two at once, on different hosts), held for
a drawn time, healed; then the pool is watched until every VM runs protected again, and:
  * never two copies: each VM's QEMUs, seen from /proc (lab/observer.py), never executed
    the guest in two places at once;
  * nothing acknowledged lost: every record the VM's client saw acknowledged since the
    campaign began is in the ledger on the disk the VM runs from now (its owner's copy at
    level 2-3, the shared image at level 1);
  * no stale copy promoted: that check after each failover, and the copies record says
    current only of copies the resync made so;
  * back to protected within RECOVERY_BOUND_S of the heal (docs/architecture.md);
  * an agent upgrade alone restarts no level 1-2 guest: the same QEMU process runs it after;
  * nothing leaked: on each host, only the QEMUs of the VMs it runs or keeps a standby of,
    each with its keeper, and only their taps and level 3 RAM files; no namespace came
    or went.
A failing cycle prints the seed, its schedule and the agents' events. The report (JSON) is
kept in the lab directory as campaign-seed<S>.json; `--seed S --replay` runs its faults
again, cycle by cycle (a fault aimed at a VM hits it where it runs then), `--cycles K`
stopping at K. A new run of the same seed draws the same faults while the pool answers
the same way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from .. import ops
from ..core.model import Level, PoolSnapshot
from ..core.replication import CopyState
from ..core.protection import protection
from ..guest.build import GuestImage
from ..store.etcd import EtcdError
from . import lab as labmod
from . import topology as topo
from ..qemu.cmdline import tap_name
from .faults import clear_disk_failure, fail_disk, slow_disk
from .observer import CopyObserver, find_copies
from .scenario import LabClient, LabPool, ScenarioError, check_acked_on_disk, sequence_breaks

RECOVERY_BOUND_S = 240.0  # heal -> every VM running and protected again (lab timing, TCG guests)
FAULTS = ("power", "agent-kill", "agent-stop", "agent-upgrade", "qemu-crash", "guest-panic", "a-link", "a-links",
          "quorum-cut", "quorum-lost", "etcd-member-kill", "disk-eio", "disk-slow")
LEVEL_OF = {1: Level.RESTART, 2: Level.COMPONENT, 3: Level.SYSTEM}


@dataclass
class Fault:
    kind: str
    host: str = ""
    peer: str = ""
    vm: str = ""
    hold_s: float = 0.0

    def __str__(self) -> str:
        where = self.host + (f"-{self.peer}" if self.peer else "") + (f" ({self.vm})" if self.vm else "")
        return f"{self.kind} {where} for {self.hold_s:.0f}s".replace("  ", " ")


@dataclass
class Cycle:
    number: int
    faults: list[Fault]
    recovery_s: dict[str, float] = field(default_factory=dict)  # vm -> heal to protected
    violations: list[str] = field(default_factory=list)
    unprotected_s: dict[str, float] = field(default_factory=dict)  # vm -> first seen unprotected to protected


@dataclass
class CampaignReport:
    seed: int
    cycles: list[Cycle] = field(default_factory=list)
    acked: dict[str, int] = field(default_factory=dict)
    unseen_overlaps: dict[str, int] = field(default_factory=dict)  # level 3: see Campaign._check
    unread: dict[str, int] = field(default_factory=dict)  # vm -> cycles whose disk check had no raw copy
    ineffective: list[str] = field(default_factory=list)           # faults the lab could not make happen

    @property
    def violations(self) -> list[tuple[int, str]]:
        return [(c.number, v) for c in self.cycles for v in c.violations]

    def to_json(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for c in self.cycles:
            for f in c.faults:
                kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return {"seed": self.seed, "cycles": len(self.cycles), "faults": dict(sorted(kinds.items())),
                "recovery_s": _recovery_table(self.cycles),
                "unprotected_s": _recovery_table(self.cycles, lambda c: c.unprotected_s), "acked": self.acked,
                "level3_unseen_overlaps": self.unseen_overlaps, "ineffective_faults": self.ineffective,
                "disk_checks_deferred": self.unread,
                "violations": [{"cycle": n, "what": v} for n, v in self.violations],
                "schedule": [{"cycle": c.number, "faults": [asdict(f) for f in c.faults],
                              "recovery_s": c.recovery_s, "unprotected_s": c.unprotected_s}
                             for c in self.cycles]}


def _recovery_table(cycles: list[Cycle], figure: Callable[[Cycle], dict[str, float]] = lambda c: c.recovery_s
                    ) -> dict[str, dict[str, float]]:
    """vm/fault -> p50, p99, max of a cycle's figure per VM (seconds): heal to protected by default."""
    seen: dict[str, list[float]] = {}
    for c in cycles:
        for vm, s in figure(c).items():
            for f in c.faults:
                seen.setdefault(f"{vm}/{f.kind}", []).append(s)
    out = {}
    for key, values in sorted(seen.items()):
        v = sorted(values)
        out[key] = {"n": len(v), "p50": round(v[len(v) // 2], 1),
                    "p99": round(v[min(len(v) - 1, int(0.99 * len(v)))], 1), "max": round(v[-1], 1)}
    return out


class Campaign:
    def __init__(self, state: labmod.LabState, image: GuestImage, seed: int, levels: tuple[int, ...],
                 progress: Callable[[str], None] = print) -> None:
        if len(state.hosts) < 3:
            raise ScenarioError("the campaign needs a lab of 3 hosts or more (`ftvm lab up --hosts 3`)")
        self.state, self.image, self.seed, self.levels = state, image, seed, levels
        self.rng = random.Random(seed)
        self.pool = LabPool(state)
        self.progress = progress
        self.vms = {f"camp{level}": level for level in levels}
        self.clients: dict[str, LabClient] = {}
        self.observers: dict[str, CopyObserver] = {}
        self.report = CampaignReport(seed)
        self.namespaces: list[str] = []  # the lab's, when the campaign began
        self.replay: list[list[Fault]] | None = None  # faults per cycle to run again, instead of drawing
        self.lost: dict[str, set[int]] = {}  # vm -> sequence numbers of acknowledged records found missing

    # --- set-up and tear-down --------------------------------------------------------------
    def start(self) -> None:
        left = (set(self.vms) & set(self.pool.snapshot().vms)) | {
            vm for vm in self.vms if (self.state.shared_dir / f"{vm}.img").exists()}
        if left:
            self.progress(f"removing the VMs an earlier campaign left: {', '.join(sorted(left))}")
            self._remove_vms()
        for i, (vm, level) in enumerate(self.vms.items()):
            self.pool.define_ledger_vm(vm, 70 + i, LEVEL_OF[level], self.image, host=self.state.hosts[i % 3],
                                       guest_restarts=100, guest_window_s=60)  # (panics are faults here)
        for vm in self.vms:
            self.pool.wait_running(vm, 120)
            self.pool.wait_answering(self._ip(vm), 120)
        self._wait_protected({})
        self.namespaces = labmod.existing_namespaces()
        for vm in self.vms:
            self.observers[vm] = CopyObserver(vm).start()
            self.clients[vm] = LabClient(self.state, self._ip(vm), f"{vm}-s{self.seed}", 0.05, reply_timeout=60)

    def stop(self) -> None:
        """Everything the campaign did is undone, whatever state a failure left it in."""
        for c in self.clients.values():
            c.stop()
        for o in self.observers.values():
            o.stop()
        st = self.state
        for name, pid in st.pids.items():  # (a stopped etcd or agent runs again)
            if name.startswith("etcd") or name.startswith("agent-"):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        for m in range(1, st.etcd_members + 1):  # (a killed member starts again)
            if not _alive(st.pids.get(labmod.etcd_member_key(m))):
                labmod.start_etcd_member(st, m)
                st.save()
        for h in st.hosts:
            with suppress(labmod.LabError, OSError):
                labmod.heal(st, h, "quorum")
            for peer in st.hosts:
                if peer > h:
                    for k in (1, 2):
                        with suppress(labmod.LabError, OSError):
                            labmod.set_a_link(st, h, peer, k, up=True)
        for h in list(st.failed):
            labmod.restore_host(st, h)
        for h in st.hosts:
            if not _alive(st.pids.get(f"agent-{h}")):
                labmod.start_agent(st, h)
                st.save()
        with suppress(labmod.LabError):
            labmod.wait_for_hosts(st, st.hosts, 60)
        self._remove_vms()

    def _remove_vms(self) -> None:
        """The campaign's VMs, and their level 1 images on the lab's shared storage."""
        for vm in self.vms:
            try:
                if vm in self.pool.snapshot().vms:
                    self.pool.stop_and_remove(vm, 60)
                (self.state.shared_dir / f"{vm}.img").unlink(missing_ok=True)
            except (ScenarioError, EtcdError, OSError) as e:
                self.progress(f"(clean-up of {vm}) {e}")

    def _ip(self, vm: str) -> str:
        return topo.vm_addr(70 + list(self.vms).index(vm)).split("/")[0]

    # --- one cycle ---------------------------------------------------------------------
    def _draw(self, n: int) -> list[Fault]:
        hosts = list(self.state.hosts)
        snap = self.pool.snapshot()
        if self.replay is not None:  # the recorded faults; one aimed at a VM hits it where it runs now
            again = [Fault(**asdict(f)) for f in self.replay[n - 1]]
            for f in again:
                view = snap.vms.get(f.vm) if f.vm else None
                if view is not None and view.owner is not None:
                    f.host = view.owner.host
            return again
        count = 2 if self.rng.random() < 0.2 else 1
        faults: list[Fault] = []
        used: set[str] = set()
        for _ in range(count):
            kind = self.rng.choice(FAULTS)
            host = self.rng.choice([h for h in hosts if h not in used] or hosts)
            f = Fault(kind, host, hold_s=round(self.rng.uniform(2, 20), 1))
            if kind in ("a-link", "a-links"):
                f.peer = self.rng.choice([h for h in hosts if h != host])
            if kind in ("qemu-crash", "disk-eio", "disk-slow", "guest-panic"):
                running = [vm for vm, v in snap.vms.items() if vm in self.vms and v.owner is not None
                           and (kind != "disk-eio" or self.vms[vm] == 2)]
                if not running:
                    continue
                f.vm = self.rng.choice(sorted(running))
                view = snap.vms[f.vm]
                assert view.owner is not None
                f.host = view.owner.host
            if kind == "quorum-lost":
                f.host, f.hold_s = "", round(self.rng.uniform(2, 4), 1)  # (within the lease: nothing stops)
                members = list(range(1, self.state.etcd_members + 1))
                self.rng.shuffle(members)
                f.peer = ",".join(map(str, sorted(members[:len(members) // 2 + 1])))
            if kind == "etcd-member-kill":
                if self.state.etcd_members < 3:
                    continue  # (one member: that is quorum-lost)
                f.host, f.peer = "", str(self.rng.randint(1, self.state.etcd_members))
            if kind in ("agent-upgrade", "guest-panic"):
                f.hold_s = 0.0  # (done at once: what follows is the pool's doing)
            used.add(f.host)
            faults.append(f)
        return faults

    def cycle(self, n: int) -> Cycle:
        faults = self._draw(n)
        c = Cycle(n, faults)
        self.progress(f"cycle {n}: {', '.join(str(f) for f in faults)}")
        for vm in self.vms:  # (an outside witness per cycle: a violation names its cycle)
            self.observers[vm].stop()
            self.observers[vm] = CopyObserver(vm).start()
        kept = {vm: find_copies(vm) for vm in self.vms if self.vms[vm] < 3}  # (an agent upgrade keeps these)
        upgraded = {f.host for f in faults if f.kind == "agent-upgrade"}
        heals: list[tuple[Fault, Callable[[], None]]] = []
        for f in faults:
            try:
                heals.append((f, self._inject(f)))
            except (labmod.LabError, OSError) as e:  # a fault the product made fail (an agent that
                c.violations.append(f"{f} failed: {e}")  # would not leave): the cycle's violation
                heals.append((f, self._mend(f)))
        lost_at: dict[str, float] = {}  # vm -> when first seen unprotected in this cycle
        hold = max((f.hold_s for f in faults), default=0)  # (the fault's length is the schedule's)
        if any(f.kind == "quorum-lost" for f in faults):
            time.sleep(hold)  # (nothing to read while etcd is stopped: its timeouts would stretch the hold)
        else:
            self._watch_protection(hold, lost_at)
        for f, heal in sorted(heals, key=lambda fh: fh[0].kind != "quorum-lost"):  # (the quorum first)
            try:
                heal()
            except (labmod.LabError, OSError) as e:
                c.violations.append(f"{f} could not be healed: {e}")
        healed = time.time()
        if any(f.kind in ("quorum-lost", "quorum-cut") for f in faults):
            # a renewal the fault delayed can still fence a host just after the heal: let that
            # happen inside this cycle, not the next one (a lease's length)
            self._watch_protection(self.state.timing["lease_ttl"], lost_at)
        try:
            protected_at = self._wait_protected(lost_at)
            c.recovery_s = {vm: round(at - healed, 1) for vm, at in protected_at.items()}
            c.unprotected_s = {vm: round(protected_at[vm] - t, 1) for vm, t in lost_at.items() if vm in protected_at}
        except ScenarioError as e:
            c.violations.append(f"not protected again within {RECOVERY_BOUND_S:g} s of the heal: {e}")
        c.violations += self._check()
        if len(faults) == 1 and upgraded:  # (alone: another fault may restart a guest for its own reasons)
            for vm, before in kept.items():
                if any(ns == topo.host_ns(h) for _, ns in before for h in upgraded) and find_copies(vm) != before:
                    c.violations.append(f"{vm}: its QEMU did not live through the agent upgrade "
                                        f"({before} -> {find_copies(vm)})")
        self.report.cycles.append(c)
        if c.violations:
            self.progress(f"cycle {n} VIOLATED: {c.violations}")
            for event in self.pool.events(200)[-40:]:
                self.progress(f"  {event}")
        return c

    def _inject(self, f: Fault) -> Callable[[], None]:
        """Do the fault; returns what heals it."""
        st = self.state

        def nothing() -> None:
            pass

        if f.kind == "power":
            labmod.fail_host(st, f.host)

            def power_back() -> None:
                labmod.restore_host(st, f.host)
                labmod.wait_for_hosts(st, [f.host], 60)
            return power_back
        if f.kind == "agent-kill":
            os.kill(st.pids[f"agent-{f.host}"], signal.SIGKILL)

            def agent_back() -> None:
                labmod.start_agent(st, f.host)
                st.save()
                labmod.wait_for_hosts(st, [f.host], 60)
            return agent_back
        if f.kind == "agent-upgrade":  # SIGUSR2, the next agent started at once (agent/adoption.py)
            labmod.restart_agent(st, f.host, timeout=60, how="detach")
            return nothing
        if f.kind == "guest-panic":  # the demo guest's kernel panics; the owner restarts it (agent/guest.py)
            if self.pool.ask(self._ip(f.vm), "X panic") != "OK X panic":
                self.report.ineffective.append(f"{f}: the guest did not take the command")
            return nothing
        if f.kind == "agent-stop":
            pid = st.pids[f"agent-{f.host}"]
            os.kill(pid, signal.SIGSTOP)
            return lambda: os.kill(pid, signal.SIGCONT)
        if f.kind == "qemu-crash":
            for pid, ns in find_copies(f.vm):
                if ns == topo.host_ns(f.host):
                    os.kill(pid, signal.SIGKILL)
            return nothing
        if f.kind == "disk-slow":
            try:
                slow_disk(st, f.vm, f.host)
            except labmod.LabError as e:
                self.progress(f"  (disk-slow not injected: {e})")
                return nothing

            def disk_fast() -> None:
                with suppress(OSError, QMPError):  # (the QEMU may have ended)
                    slow_disk(st, f.vm, f.host, slow=False)
            return disk_fast
        if f.kind in ("a-link", "a-links"):
            links = (1,) if f.kind == "a-link" else (1, 2)
            for k in links:
                labmod.set_a_link(st, f.host, f.peer, k, up=False)

            def links_up() -> None:
                for k in links:
                    labmod.set_a_link(st, f.host, f.peer, k, up=True)
            return links_up
        if f.kind == "quorum-cut":
            labmod.partition(st, f.host, "quorum")
            return lambda: labmod.heal(st, f.host, "quorum")
        if f.kind == "quorum-lost":  # a majority of the members stopped (`peer`: which)
            pids = [st.pids[labmod.etcd_member_key(int(m))] for m in (f.peer or "1").split(",")]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)

            def quorum_back() -> None:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            return quorum_back
        if f.kind == "etcd-member-kill":  # one member of three: the quorum stays
            member = int(f.peer)
            os.kill(st.pids[labmod.etcd_member_key(member)], signal.SIGKILL)

            def member_back() -> None:
                labmod.start_etcd_member(st, member)
                st.save()
            return member_back
        if f.kind == "disk-eio":
            try:
                fail_disk(st, f.vm, f.host)
            except labmod.LabError as e:
                self.progress(f"  (disk-eio not injected: {e})")
                return nothing
            injected = time.time()

            def disk_healed() -> None:
                def failed(s: PoolSnapshot) -> bool:
                    return s.vms[f.vm].copy_state(f.host) is CopyState.FAILED
                try:
                    self.pool.wait_for(f"the copy of {f.vm} on {f.host} recorded failed", failed, 60)
                except ScenarioError:
                    # Not masked. Either nothing was left to continue on (the partner's copy was
                    # away: the guest waits paused) or no I/O reached the injected node (lab/
                    # faults.py matches node names, and a repaired copy's graph has spare nodes
                    # by those names). The failure ends, as a transient one does: the paused
                    # guest's I/O is retried and goes through.
                    clear_disk_failure(st, f.vm, f.host)
                    if not any(e.vm == f.vm and e.kind == "io-error" and e.time > injected
                               for e in self.pool.events(200)):
                        self.report.ineffective.append(f"{f}: no I/O error reached the guest's writes")
                        self.progress(f"  ({f}: no I/O error reached the guest's writes; not a fault this cycle)")
                    return
                # the operator's part: `ftvm vm repair-disk VM --host H`
                self.pool.run(lambda store: ops.repair_disk(store, f.vm, f.host))
            return disk_healed
        raise ValueError(f.kind)

    # --- invariants --------------------------------------------------------------------
    def _mend(self, f: Fault) -> Callable[[], None]:
        """What puts the lab right after `f` itself failed, so later cycles still run."""
        if f.kind in ("agent-upgrade", "agent-kill", "agent-stop"):
            return lambda: labmod.restart_agent(self.state, f.host, timeout=60, how="kill")
        return lambda: None

    def _protection_now(self, lost_at: dict[str, float]) -> dict[str, bool] | None:
        """Each VM protected or not, as the pool says now (None: unreadable); the first time
        a VM is seen unprotected goes into `lost_at`."""
        try:
            snap = self.pool.snapshot()
        except Exception:  # noqa: BLE001 - (the quorum may be cut or coming back)
            return None
        now, seen = time.time(), {}
        for vm in self.vms:
            view = snap.vms.get(vm)
            seen[vm] = view is not None and protection(snap, view).protected
            if not seen[vm]:
                lost_at.setdefault(vm, now)
        return seen

    def _watch_protection(self, seconds: float, lost_at: dict[str, float]) -> None:
        """Hold the fault `seconds`, noting when each VM is first seen unprotected."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._protection_now(lost_at)
            time.sleep(max(0.0, min(0.5, end - time.monotonic())))

    def _wait_protected(self, lost_at: dict[str, float]) -> dict[str, float]:
        """When each VM was seen protected again (wall clock), once every one is; `lost_at`
        as in `_protection_now`. ScenarioError after RECOVERY_BOUND_S."""
        done: dict[str, float] = {}
        deadline = time.monotonic() + RECOVERY_BOUND_S
        while len(done) < len(self.vms):
            if time.monotonic() > deadline:
                missing = sorted(set(self.vms) - set(done))
                raise ScenarioError(f"{', '.join(missing)} not protected")
            seen = self._protection_now(lost_at)
            for vm, ok in (seen or {}).items():
                if ok and vm not in done:
                    done[vm] = time.time()
            time.sleep(0.5)
        return done

    def _check(self) -> list[str]:
        out = []
        snap = self.pool.snapshot()
        for vm, obs in self.observers.items():
            if obs.max_executing <= 1:
                continue
            seen = obs.overlaps[-1] if obs.overlaps else ""
            if self.vms[vm] == 3 and sequence_breaks(self.clients[vm].acks())[1] == 0:
                # a level 3 copy cut from its partner executes unseen, its output held, until
                # paused or killed: what the client saw says whether two copies answered
                self.report.unseen_overlaps[vm] = self.report.unseen_overlaps.get(vm, 0) + 1
                self.progress(f"  ({vm}: an old copy executed unseen beside the new one, no reply from it: {seen})")
                continue
            out.append(f"{vm}: two copies executed at once ({seen})")
        for vm, client in self.clients.items():
            acks = client.acks()
            self.report.acked[vm] = len(acks)
            view = snap.vms.get(vm)
            if view is None or view.owner is None:
                out.append(f"{vm} has no owner after the cycle")
                continue
            image = Path(self.state.dir) / f"campaign-{vm}.raw"
            try:
                if view.spec.level.has_copies:
                    # a current copy, raw (read while the guest writes: a live qcow2's newest
                    # clusters may not be in its file's tables yet, as QEMU caches them)
                    raw = [h for h in view.copies.current_hosts() if self.pool.copy_path(vm, h)[1] == "raw"] \
                        if view.copies else []
                    if not raw:  # (both current copies qcow2: read at a later cycle, the records add up)
                        self.report.unread[vm] = self.report.unread.get(vm, 0) + 1
                        self.progress(f"  ({vm}: no current raw copy to read; its records are checked later)")
                        continue
                    where = view.owner.host if view.owner.host in raw else raw[0]
                    self.pool.copy_as_raw(vm, where, image)
                    _, lost = check_acked_on_disk(image, acks)
                else:  # (the image on shared storage)
                    _, lost = check_acked_on_disk(Path(view.spec.disks[0].path), acks)
            except (subprocess.CalledProcessError, OSError, ScenarioError) as e:
                out.append(f"{vm}: its disk could not be read: {e}")
                continue
            finally:
                image.unlink(missing_ok=True)
            new = [a for a in lost if a.seq not in self.lost.setdefault(vm, set())]
            if new:  # (each loss once: the records checked add up, so it would show every cycle after)
                self.lost[vm] |= {a.seq for a in new}
                out.append(f"{vm}: {len(new)} acknowledged records missing from the disk it runs from "
                           f"(first: {new[0]})")
        return out + self._leaks(snap)

    def _leaks(self, snap: PoolSnapshot) -> list[str]:
        """Nothing leaked: on each host, each QEMU belongs to a VM running or kept there and has
        one keeper; taps and level 3 RAM files only of such VMs; the lab's namespaces and no
        other."""
        out = []
        if sorted(labmod.existing_namespaces()) != sorted(self.namespaces):
            out.append(f"namespaces changed: {sorted(self.namespaces)} -> {sorted(labmod.existing_namespaces())}")
        for host in self.state.hosts:
            if host in self.state.failed:
                continue
            ns = topo.host_ns(host)
            here: set[str] = set()  # the VMs this host runs or keeps a copy of
            for vm in self.vms:
                copies = [pid for pid, where in find_copies(vm, waiting_too=True) if where == ns]
                view = snap.vms.get(vm)
                runs = view is not None and view.owner is not None and view.owner.host == host
                keeps = view is not None and view.copies is not None and host in view.copies.copies
                here |= {vm} if runs or (keeps and self.vms[vm] == 3) else set()
                allowed = 1 if runs else 0
                if self.vms[vm] == 3:
                    allowed += 1  # (a partner's standby started ahead: agent/warm.py)
                if len(copies) > allowed:
                    out.append(f"{vm}: {len(copies)} QEMUs on {host}, at most {allowed} expected")
            counts = _keepers_and_qemus(ns)
            for _ in range(20):  # (a QEMU starting now, a standby ahead: its keeper forks, then execs)
                if counts[0] == counts[1]:
                    break
                time.sleep(0.5)
                counts = _keepers_and_qemus(ns)
            if counts[0] != counts[1]:
                out.append(f"{host}: {counts[0]} keepers for {counts[1]} QEMUs (for 10 s)")
            listed = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "type", "tun"], capture_output=True,
                                    text=True).stdout
            taps = {line.split(":")[1].strip().split("@")[0] for line in listed.splitlines() if ":" in line}
            allowed_taps = {tap_name(vm) for vm in here}
            stray = sorted(t for t in taps if t.startswith("ft") and t not in allowed_taps)
            if stray:
                out.append(f"{host}: taps of no VM running or kept there: {', '.join(stray)}")
            ram = topo.LAB_RAM_DIR / host
            files = {d.name for d in ram.iterdir() if not d.name.startswith(".")} if ram.is_dir() else set()
            extra = files - here - self._other_vms(snap)
            if extra:
                out.append(f"{host}: level 3 RAM files of VMs not kept there: {sorted(extra)}")
        return out

    def _other_vms(self, snap: PoolSnapshot) -> set[str]:
        """VMs the campaign did not make (another test's, left running): not its business."""
        return set(snap.vms) - set(self.vms)


def _keepers_and_qemus(ns: str) -> tuple[int, int]:
    commands = [_cmdline(pid) for pid in labmod.ns_pids(ns)]
    return (sum(1 for c in commands if b"ftvm.qemu.keeper" in c),
            sum(1 for c in commands if c.startswith(b"qemu-system")))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int | None) -> bool:
    return pid is not None and labmod.running(pid)


def run_campaign(state: labmod.LabState, image: GuestImage, seed: int, cycles: int, levels: tuple[int, ...],
                 progress: Callable[[str], None] = print, replay: list[list[Fault]] | None = None,
                 report_to: Path | None = None) -> CampaignReport:
    """`replay`: the faults of each cycle, as a report recorded them (`recorded_schedule`),
    instead of drawing them from the seed. `report_to`: the report is written there after
    every cycle (a run cut short keeps what it found)."""
    camp = Campaign(state, image, seed, levels, progress)
    camp.replay = replay
    if replay is not None:
        cycles = min(cycles, len(replay))
    camp.start()
    try:
        for n in range(1, cycles + 1):
            camp.cycle(n)
            if report_to is not None:
                dump(camp.report, report_to)
    finally:
        camp.stop()
    return camp.report


def render(report: CampaignReport) -> str:
    d = report.to_json()
    faults = ", ".join(f"{k} {v}" for k, v in d["faults"].items())
    lines = [f"seed {d['seed']}: {d['cycles']} cycles; faults: {faults}",
             "acknowledged records checked on disk: " + ", ".join(f"{k} {v}" for k, v in d["acked"].items()),
             "heal -> protected again (s):"]
    for key, r in d["recovery_s"].items():
        lines.append(f"  {key:<24} n={r['n']:<4} p50 {r['p50']:>6}  p99 {r['p99']:>6}  max {r['max']:>6}")
    lines.append("first seen unprotected -> protected again (s), the VMs a fault touched:")
    for key, r in d["unprotected_s"].items():
        lines.append(f"  {key:<24} n={r['n']:<4} p50 {r['p50']:>6}  p99 {r['p99']:>6}  max {r['max']:>6}")
    if d["disk_checks_deferred"]:
        lines.append("disk checks deferred to a later cycle (no current raw copy to read): " + ", ".join(
            f"{k} {v}" for k, v in d["disk_checks_deferred"].items()))
    lines.append(f"invariant violations: {len(d['violations'])}")
    for v in d["violations"]:
        lines.append(f"  cycle {v['cycle']}: {v['what']}")
    return "\n".join(lines)


def recorded_schedule(path: Path) -> tuple[int, list[list[Fault]]]:
    """The seed and the faults of each cycle of a campaign's JSON report (`dump`), for
    `--replay`. ValueError if the file is not one."""
    try:
        d = json.loads(path.read_text())
        return int(d["seed"]), [[Fault(**f) for f in c["faults"]] for c in d["schedule"]]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a campaign report ({e})") from None


def dump(report: CampaignReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2))
