"""A guest that failed on its own, on this host: restart it where it runs, or give up.

    QEMU: GUEST_PANICKED (pvpanic; QEMU runs `-action panic=none`, so the guest is left as
          its kernel leaves it: spinning, or rebooting itself)   -> cause "guest kernel panic"
          WATCHDOG (its watchdog device fired; QEMU reset it)     -> cause "guest watchdog"
    the tick (core/decide.py): GUEST_FAILED for a VM running here with a cause
    here: the verdict (core/guest_failures.py: at most `guest_restarts` per `guest_window_s`)
          recorded under the fencing token (`vms/<vm>/guest`, kept across hosts), then
          restart: `system_reset` (a watchdog's reset has happened already)  -> running
          give up: the VM is powered off here; decide releases it, and no host starts
                   it again until an operator does (`ftvm vm start`)

Every failure is an event with its cause and an availability record (`down`, cause
"guest ..."), so reports count guest outages apart from host failovers. At level 3 the
crash is in the partner's replica too: the VM restarts here, the partner never takes over
(the primary keeps checkpointing through the reset).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
import time

from ..api.metrics import AgentCounters
from ..core.decide import Decision
from ..core.guest_failures import WATCHDOG, GuestFailure, GuestPolicy, on_guest_failure
from ..core.model import PoolSnapshot, RunState
from ..qemu.process import QemuError
from ..store.etcd import EtcdError
from .context import HostContext
from .local import spawn
from .processes import Processes

log = logging.getLogger("ftvm.agent.guest")

class GuestFailures:
    def __init__(self, host: HostContext, procs: Processes, counters: AgentCounters) -> None:
        self.host, self.procs, self.counters = host, procs, counters
        self.store, self.me = host.store, host.me

    async def handle(self, d: Decision, snapshot: PoolSnapshot) -> None:
        """Carry out a GUEST_FAILED decision: record the failure, then restart or give up."""
        rec = self.procs.vms.get(d.vm)
        view = snapshot.vms.get(d.vm)
        if rec is None or view is None or rec.qemu is None or d.token is None or rec.guest_failure is None:
            return
        cause, rec.guest_failure = rec.guest_failure, None
        spec = view.spec
        verdict = on_guest_failure(view.guest, GuestFailure(time.time(), cause, self.me),
                                   GuestPolicy(spec.guest_restarts, spec.guest_window_s))
        try:
            if not await self.store.record_guest(d.vm, d.token, verdict.record):
                return  # no longer the owner: the kill follows
        except EtcdError as e:
            rec.guest_failure = cause  # tried again at the next tick
            log.warning("%s: guest failure not recorded yet: %s", d.vm, e)
            return
        self.host.journal.history(d.vm, "down", cause)
        self.counters.guest_failures[d.vm] = self.counters.guest_failures.get(d.vm, 0) + 1
        if verdict.restart:
            checkpointer = rec.l3.checkpointer if rec.l3 is not None else None
            try:
                # (level 3: between two checkpoints, or `cont` meets one's migrate under way)
                async with checkpointer.between_epochs() if checkpointer is not None else nullcontext():
                    if cause != WATCHDOG:  # (QEMU reset it already)
                        await rec.qemu.execute("system_reset")
                    status = (await rec.qemu.execute("query-status"))["status"]
                    if status in ("paused", "guest-panicked"):
                        await rec.qemu.execute("cont")
            except QemuError as e:
                self.host.journal.event(d.vm, "error", f"{cause}: the guest could not be reset ({e})")
                return
            rec.guest_booted = time.monotonic()  # its health probe waits out the grace again
            self.host.journal.history(d.vm, "up", "guest restarted")
            self.host.journal.event(d.vm, "guest-restart", verdict.reason)
            return
        self.host.journal.event(d.vm, "guest-gave-up", verdict.reason)
        rec.state, rec.detail = RunState.STOPPING, verdict.reason
        spawn(self.procs.stop(rec, rec.qemu, 0.0), name=f"give-up-{d.vm}")
