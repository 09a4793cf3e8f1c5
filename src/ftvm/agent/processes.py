"""The QEMU processes of this host's VMs: how one is started, watched and stopped, and
what an exit nobody asked for means (a crash: restart back-off, core/restart.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.guest_failures import failure_of
from ..core.model import RunState, VmSpec
from ..core.restart import after_exit
from ..qemu.cmdline import VmPaths
from ..qemu.probe import Accel
from ..qemu.process import Fence, QemuVm
from ..qemu.runas import RunAs
from ..qemu.tls import QemuTls
from ..l3.writes import Support, shim_env
from ..store.etcd import EtcdError
from .config import AgentConfig
from .fence import FenceGuard
from .journal import Journal
from .local import LocalRecord, spawn

log = logging.getLogger("ftvm.agent.processes")

# QMP events worth an entry in the event log; exits are seen by the process watcher.
NOTABLE_QEMU_EVENTS = frozenset({"SHUTDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED",
                                 "BLOCK_IO_ERROR", "WATCHDOG"})


class Processes:
    def __init__(self, cfg: AgentConfig, journal: Journal, guard: FenceGuard, wake: Callable[[], None],
                 qemu_tls: QemuTls | None, run_as: RunAs | None) -> None:
        self.cfg, self.t = cfg, cfg.timing
        self.journal, self.guard, self.wake = journal, guard, wake
        self.qemu_tls, self.run_as = qemu_tls, run_as
        self.accel: Accel | None = None  # chosen when the agent starts
        self.tracking = Support(None, "page compare: not probed")  # level 3 RAM (probed at start)
        self.vms: dict[str, LocalRecord] = {}

    @property
    def inexact_dirty_tracking(self) -> bool:
        """QEMU's own dirty tracking misses writes here (TCG): migration.STOPPED_COPY_WHY."""
        return self.accel is None or self.accel.accel != "kvm"

    def describe(self, qemu: QemuVm) -> str:
        return f"pid {qemu.pid}, {self.accel.accel if self.accel else '?'}"

    async def launch(self, spec: VmSpec, paths: VmPaths, **how: Any) -> QemuVm:
        """Start a QEMU for `spec` the way this host runs them (accelerator, bridge, TLS keys,
        QEMU's user, the lab's debug socket), its events reported as the VM's; `how`: the
        rest of `QemuVm.start`'s arguments (disks as block nodes, paused, incoming, ...)."""
        assert self.accel is not None
        vm = spec.name
        if how.get("checkpointed") is not None and self.tracking.shim is not None:
            how["env"] = shim_env(self.tracking.shim)  # level 3: its RAM's writes tracked exactly
        return await QemuVm.start(spec, paths, self.accel, self.cfg.bridge,
                                  on_event=lambda name, data: self.on_qemu_event(vm, name, data),
                                  debug_qmp=self.cfg.debug_qmp, tls=self.qemu_tls, run_as=self.run_as,
                                  fence=self.fence, **how)

    @property
    def fence(self) -> Fence:
        """The deadline every QEMU's keeper enforces (written by the fence guard)."""
        assert self.guard.deadline_file is not None
        return Fence(self.guard.deadline_file, self.guard.lease, self.t.fence_check)

    def adopt(self, rec: LocalRecord, qemu: QemuVm) -> None:
        """`qemu` runs the VM now: the fence guard kills it if the lease lapses, and its exit
        is watched."""
        self.guard.register(rec.name, qemu.pidfd)
        self.watch(rec, qemu)

    def watch(self, rec: LocalRecord, qemu: QemuVm) -> None:
        spawn(self._watch(rec, qemu), name=f"watch-{rec.name}")

    async def stop(self, rec: LocalRecord, qemu: QemuVm, grace: float) -> None:
        """Ask the guest to power off within `grace` seconds (0: at once), and say how it ended."""
        try:
            if rec.l3 is not None:  # the partner must not take over a VM being stopped
                try:
                    await asyncio.wait_for(
                        rec.l3.retire(f"VM stopped on {self.cfg.name}: its own copy is the latest"), 5.0)
                except (EtcdError, TimeoutError) as e:
                    log.warning("%s: ending level 3 protection before the stop: %s", rec.name, e)
        finally:
            t0 = time.monotonic()
            await qemu.stop(grace, rec.stop_hurry)
            took = time.monotonic() - t0
            if grace > 0:
                outcome = {"guest": f"the guest powered off after {took:.1f} s",
                           "grace expired": f"the guest did not power off within {grace:g} s: powered off",
                           "hurried": f"powered off after {took:.1f} s (forced)"}.get(
                               qemu.stop_outcome, f"QEMU ended ({qemu.stop_outcome})")
                self.journal.event(rec.name, "stop", outcome)

    def on_qemu_event(self, vm: str, name: str, data: dict[str, Any]) -> None:
        rec = self.vms.get(vm)
        cause = failure_of(name)
        if cause is not None and rec is not None and rec.state is RunState.RUNNING and rec.guest_failure is None:
            rec.guest_failure = cause  # the tick decides (GUEST_FAILED: agent/guest.py)
        if rec is not None and rec.replica is not None:
            rec.replica.on_qemu_event(name, data)
        if rec is not None and rec.l3 is not None and name in ("STOP", "RESUME"):
            return  # level 3 stops the guest at every checkpoint: not news
        if name in NOTABLE_QEMU_EVENTS:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(data.items()) if not isinstance(v, dict))
            self.journal.event(vm, "qemu", f"QEMU event {name}" + (f" ({detail})" if detail else ""))
            self.wake()

    async def _watch(self, rec: LocalRecord, qemu: QemuVm) -> None:
        code = await qemu.proc.wait()
        if rec.qemu is not None and rec.qemu is not qemu:  # replaced by a new QEMU (raised to level 3)
            await qemu.wait()
            return
        self.guard.unregister(rec.name)  # before the pidfd is closed
        rec.kept_write_through = []
        if rec.replica is not None:
            rec.replica.stop()
        if rec.l3 is not None:
            try:
                await asyncio.wait_for(rec.l3.close(), 5.0)
            except Exception as e:  # noqa: BLE001 - the exit must be recorded whatever happens (timeouts too)
                log.warning("%s: closing the level 3 runtime: %s", rec.name, e or type(e).__name__)
        await qemu.wait()
        if self.vms.get(rec.name) is not rec:
            return
        rec.exit_code = code
        if qemu.stop_requested or rec.state is RunState.STOPPING or (rec.l3 is not None and rec.l3.superseded):
            rec.state = RunState.STOPPED
            self.journal.event(rec.name, "stopped", f"QEMU exited (code {code})")
        else:
            rec.state = RunState.CRASHED
            why = rec.detail if rec.detail == "self-fenced" else f"QEMU exited unasked (code {code})"
            if rec.token:  # a VM this host ran (not a migration target that never ran it)
                self.journal.history(rec.name, "down", why)
            rec.detail = why
            partner = self.t.l3_takeover_after if rec.l3 is not None and rec.l3.partner_current() else None
            retry = after_exit(rec.failures, time.time() - qemu.started_at, time.monotonic(), partner)
            rec.failures, rec.retry_at = retry.failures, retry.at
            self.journal.event(rec.name, "exit", why)
        self.wake()
