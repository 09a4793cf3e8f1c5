"""What a new agent does with the VMs its predecessor left running.

QEMUs are kept by keepers (qemu/keeper.py), not by the agent, so a guest lives through
an agent restart (an upgrade, a crash). Each tick the agent writes beside every QEMU it
runs what that QEMU is (`vm.json`: the VM, its fencing token, the spec it was started
with, its level 2 copies, whether its NICs go through the agent's relays). A keeper
whose agent ends kills its QEMU unless that record says it may be adopted (its NICs are
its own taps): a level 3 QEMU, a warm standby or a migration's target ends with its
agent as before keepers, so no guest runs unseen after its agent. A new agent
that took its predecessor's lease over (agent/lease.py) reads the first snapshot, then,
for each keeper still running, before its first tick:

  * a level 0/1/2 VM this host still owns under the recorded token: adopted. QMP is
    connected again, the fence guard and the exit watch take it, and a level 2 VM's
    replica manager is rebuilt from QEMU's block graph (`ReplicaManager.adopt` settles
    what the old agent left half done). A paused guest is continued: only the agent
    pauses one, and that agent is gone.
  * a VM whose NICs went through the old agent's output-commit relays (level 3, or
    lowered from it while running): killed. The relays died with that agent and QEMU
    7.2's stream netdev does not reconnect, so the guest is cut off from its network.
    Its partner takes over from the last checkpoint (the clients' connections stay
    open), or with no current partner it restarts here (the crash policy).
  * anything else (a warm standby, a migration's target, a QEMU caught mid-migration, a
    VM owned elsewhere or under another token, no readable record): killed; the tick
    starts again what is needed.

Why this is safe: an adopted QEMU was never unfenced. Its keeper held it to the
lease's deadline the whole time; the lease is the same one (a new lease ends every
keeper of the old one); and the first tick still checks ownership as for any VM here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.model import PoolSnapshot, RunState, VmSpec
from ..core.replication import CopyState
from ..core.restart import HEALTHY_RUN_S, after_exit
from ..dr.capture import clear_stale_points
from ..qemu import keeper
from ..qemu.blockgraph import DiskGraph, LocalImage, graph_of
from ..qemu.cmdline import VmPaths, tap_names
from ..qemu.process import QemuError, QemuVm, remove_tap
from .context import HostContext
from .local import LocalRecord
from .processes import Processes
from .replica import ReplicaManager

log = logging.getLogger("ftvm.agent.adoption")

ADOPTABLE = frozenset({"running", "paused", "io-error"})


@dataclass(frozen=True)
class KeptVm:
    """What the agent wrote beside a QEMU it ran (`vm.json`)."""

    vm: str
    token: int
    spec: VmSpec
    images: tuple[LocalImage, ...] | None  # level 2: this host's copies (None: not mirrored)
    relayed_nics: bool                      # NICs through the agent's relays (level 3 QEMU)

    def to_json(self) -> dict[str, Any]:
        return {"v": 1, "vm": self.vm, "token": self.token, "spec": self.spec.to_json(),
                "images": None if self.images is None else [
                    {"path": i.path, "format": i.format, "write_through": i.write_through} for i in self.images],
                "relayed_nics": self.relayed_nics}

    @staticmethod
    def from_json(d: Any) -> KeptVm:
        images = d["images"]
        return KeptVm(str(d["vm"]), int(d["token"]), VmSpec.from_json(d["spec"]),
                      None if images is None else tuple(
                          LocalImage(str(i["path"]), str(i["format"]), bool(i["write_through"])) for i in images),
                      bool(d["relayed_nics"]))


def describe(rec: LocalRecord) -> KeptVm | None:
    if rec.qemu is None or rec.state is not RunState.RUNNING:
        return None
    return KeptVm(rec.name, rec.token, rec.qemu.spec,
                  tuple(rec.replica.images) if rec.replica is not None else None, rec.l3 is not None)


class Adoption:
    def __init__(self, host: HostContext, procs: Processes, vms_root: Path) -> None:
        self.host, self.procs, self.root = host, procs, vms_root
        self._written: dict[tuple[Path, int], dict[str, Any]] = {}  # (file, QEMU pid) -> what it says

    # --- each tick: what runs here, for the next agent -------------------------------------
    def record(self) -> None:
        for rec in self.procs.vms.values():
            kept = describe(rec)
            if kept is None or rec.qemu is None:
                continue
            path = rec.qemu.paths.run_dir / keeper.META_FILE
            value = kept.to_json()
            if self._written.get((path, rec.qemu.pid)) == value:
                continue
            try:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(value))
                os.replace(tmp, path)
                self._written = {k: v for k, v in self._written.items() if k[0] != path}
                self._written[(path, rec.qemu.pid)] = value
            except OSError as e:
                log.warning("%s: cannot record what its QEMU runs (%s): an agent restart would end it", rec.name, e)

    # --- at start-up ---------------------------------------------------------------------
    async def adopt_all(self, snapshot: PoolSnapshot, lease_resumed: bool) -> None:
        self._report_fenced()
        for kept in await asyncio.to_thread(keeper.find, self.root):
            meta = read_record(kept.run_dir)
            try:
                if not lease_resumed:
                    why_not: str | None = "the host lease was not kept"
                elif isinstance(meta, str):
                    why_not = meta
                else:
                    why_not = await self._adopt(kept, meta, snapshot)
            except (QemuError, OSError, KeyError, ValueError, TypeError) as e:
                why_not = f"could not be adopted: {e}"
            if why_not is not None:
                await self._end(kept, meta if isinstance(meta, KeptVm) else None, why_not, snapshot)
        in_use = {t for rec in self.procs.vms.values() if rec.qemu is not None for t in rec.qemu.taps}
        for tap in await asyncio.to_thread(stale_taps, in_use, self.procs.run_as.uid if self.procs.run_as else None):
            await asyncio.to_thread(remove_tap, tap)
            log.info("removed tap %s: no QEMU here uses it (left by a QEMU that ended without its agent)", tap)

    def _report_fenced(self) -> None:
        """Say which QEMUs their keepers killed while no agent ran: at the fence deadline, or
        as their agent ended (those it could not leave running)."""
        for path in sorted(self.root.glob(f"**/{keeper.EXIT_FILE}")) if self.root.is_dir() else []:
            try:
                ended = json.loads(path.read_text())
                if not (ended.get("fenced") or ended.get("orphaned")) or ended.get("reported"):
                    continue
                tmp = path.with_name(path.name + ".tmp")  # (a crash here must not leave half a file)
                tmp.write_text(json.dumps({**ended, "reported": True}))
                os.replace(tmp, path)
            except (OSError, ValueError, AttributeError):
                continue
            vm = path.parent.name if path.parent.parent == self.root else path.parent.parent.name
            if ended.get("fenced"):
                self.host.journal.event(vm, "fence", "QEMU killed by its keeper at the fence deadline, before the "
                                                     "host lease could expire: no agent renewed it")
            else:
                self.host.journal.event(vm, "stopped", "QEMU ended with the previous agent (its NICs went through "
                                                       "that agent's relays, or it ran no guest of its own yet)")

    async def _adopt(self, kept: keeper.Kept, meta: KeptVm, snapshot: PoolSnapshot) -> str | None:
        """Adopt `kept`, which `meta` says runs, or say why not."""
        view = snapshot.vms.get(meta.vm)
        if kept.run_dir != self.root / meta.vm or meta.vm in self.procs.vms:
            return "not the VM's own QEMU"
        if view is None or view.owner is None or view.owner.host != self.host.me or view.owner.token != meta.token:
            return "no longer owned here under its token"
        if meta.relayed_nics:
            return ("its NICs went through the old agent's output-commit relays, which ended with it "
                    "(the partner takes over from the last checkpoint, or it restarts here)")
        rec = LocalRecord(meta.vm, meta.token, RunState.RUNNING)
        taps = tap_names(meta.spec)
        qemu = await QemuVm.adopt(meta.spec, VmPaths(kept.run_dir), kept, taps, self.procs.run_as,
                                  lambda name, data: self.procs.on_qemu_event(meta.vm, name, data))
        try:
            status = str((await qemu.execute("query-status"))["status"])
            migration = (await qemu.execute("query-migrate")).get("status")
            if status not in ADOPTABLE or migration in ("setup", "active", "pre-switchover", "device", "completed"):
                raise QemuError(f"QEMU is {status} (migration: {migration})")
            await clear_stale_points(qemu)  # the old agent's DR point in flight, if any
            if meta.images is not None:
                graph = await qemu.execute("x-debug-query-block-graph")
                graphs = [graph_of(i, graph) for i in range(len(meta.images))]
                if any(g is None for g in graphs):
                    raise QemuError("its disks are not in a level 2 graph ftvm knows")
                rec.qemu = qemu
                rec.replica = ReplicaManager(self.host.for_vm(meta.vm, meta.token), qemu, list(meta.images),
                                             [g for g in graphs if isinstance(g, DiskGraph)])
                await rec.replica.adopt(status)
            elif status == "paused":
                await qemu.execute("cont")
        except BaseException:
            qemu.kill()
            await qemu.wait()
            raise
        rec.qemu, rec.since = qemu, qemu.started_at
        rec.detail = self.procs.describe(qemu)
        self.procs.vms[meta.vm] = rec
        self.procs.adopt(rec, qemu)
        self.host.journal.event(meta.vm, "adopt", f"agent restarted: the VM kept running (QEMU pid {qemu.pid}, "
                                                  f"level {int(view.spec.level)}"
                                                  + (f", disks {rec.replica.mode.value}" if rec.replica else "")
                                                  + f", was {status}): adopted")
        return None

    async def _end(self, kept: keeper.Kept, meta: KeptVm | None, why: str, snapshot: PoolSnapshot) -> None:
        """Kill a QEMU not adopted (`meta`: its record, if readable). A VM still owned here is
        then as after a crash: its level 3 partner takes over, or it starts again here after
        the back-off (core/restart.py)."""
        try:
            fd = kept.open_pidfd()
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
        await kept.wait()
        kept.close()
        name = meta.vm if meta else kept.run_dir.name
        self.host.journal.event(name, "kill", f"QEMU left running by the previous agent ended: {why}")
        view = snapshot.vms.get(name)
        if (meta is None or name in self.procs.vms or view is None or view.owner is None
                or (view.owner.host, view.owner.token) != (self.host.me, meta.token)):
            return
        copies = view.copies
        partner = copies.partner_of(self.host.me) if copies else None
        state = copies.state_of(partner) if copies is not None and partner is not None else None
        current = state is not None and state.state is CopyState.CURRENT
        retry = after_exit(0, HEALTHY_RUN_S, time.monotonic(), self.host.timing.l3_takeover_after if current else None)
        self.host.journal.history(name, "down", f"QEMU ended at an agent restart: {why}")
        self.procs.vms[name] = LocalRecord(name, meta.token, RunState.CRASHED, exit_code=-int(signal.SIGKILL),
                                           detail=f"ended at an agent restart: {why}", failures=retry.failures,
                                           retry_at=retry.at)


def read_record(run_dir: Path) -> KeptVm | str:
    """What the agent recorded beside a QEMU (`vm.json`), or why it cannot be read."""
    try:
        return KeptVm.from_json(json.loads((run_dir / keeper.META_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"no record of what it runs ({e})"


def stale_taps(in_use: set[str], owner: int | None) -> list[str]:
    """ftvm's taps on this host (named by `cmdline.tap_name`, owned by QEMU's user) that no
    running QEMU here uses: a QEMU that ended while no agent ran leaves its taps behind."""
    found = []
    for dev in Path("/sys/class/net").iterdir():
        if not dev.name.startswith("ft") or dev.name in in_use or not (dev / "tun_flags").exists():
            continue
        try:
            tap_owner = int((dev / "owner").read_text())
        except (OSError, ValueError):
            continue
        if tap_owner == (owner if owner is not None else -1):
            found.append(dev.name)
    return found
