"""Level 3 partner: a QEMU started ahead on the replica files, so that a takeover (or a
planned switchover) only loads the committed device state and continues.

Starting QEMU took 0.1-0.6 s of a takeover on a loaded lab host (50 ms on an idle one):
with the takeover decided 0.5 s after the primary fell silent, the guest often ran again
only after the client's second TCP retransmission (~0.75 s), and its next reply came at
~1.8 s. A *warm* QEMU is started once the partner has held committed checkpoints of a
session for a second (agent/l3.py `WARM_AFTER_S`), with the command line a start from the
replica would use (`-incoming defer`):

    session S protected for 1 s ──► launch: relays listening (no taps yet),
        taps made on the bridge but not opened (no carrier: the bridge sends them nothing),
        QEMU -incoming defer -S on the replica RAM file and disks, capabilities set
    takeover / switchover ──► Starts takes it: taps opened by the relays, device state
        loaded, cont (agent/starts.py)
    session ends or changes, VM no longer partnered here, spec changed, QEMU died
        ──► killed, relays closed, taps removed (a new one follows the next session's commit)

Why it is safe:
  * it runs nothing: its vCPUs wait for an incoming state that only a start given the
    VM's fencing token sends (`Starts`, which also registers it with the fence guard);
  * its RAM is the replica file, mapped shared: what the standby applies later shows
    through the mapping, so it holds exactly what a QEMU started at takeover time would;
    nothing in QEMU writes guest RAM while it waits for an incoming state;
  * it ends with the agent (its keeper kills it: qemu/keeper.py), as a level 3 QEMU does;
  * the lab's outside witness (lab/observer.py) counts a QEMU as a running copy once its
    vCPU threads have run, so a waiting one is not a second copy, and an adopted one is.

One per VM, keyed by session: every operation on a VM's warm QEMU (launch, take,
discard) holds that VM's lock, so a start never meets a half-closed one, and a discard
can never remove the taps of a VM a start has just given its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from ..core.model import VmSpec
from ..l3.relay import OutputCommitRelay
from ..qemu.process import QemuError, QemuVm, remove_tap

log = logging.getLogger("ftvm.agent.warm")

RESERVE_S = 30.0     # a taken-over VM's warm QEMU waits this long for its start
RETRY_S = 10.0       # after a failed launch


def machine_of(spec: VmSpec) -> tuple[Any, ...]:
    """What a QEMU's command line is made of: a warm QEMU serves only a start of this."""
    return (spec.name, spec.memory_mib, spec.vcpus, spec.disks, spec.nics, spec.boot, spec.definition)


@dataclass
class WarmQemu:
    vm: str
    session: str                 # the checkpoint session whose commit it was started after
    machine: tuple[Any, ...]
    qemu: QemuVm
    relays: list[OutputCommitRelay]
    taps: list[str]
    started: float = field(default_factory=time.monotonic)
    reserved_at: float | None = None  # a takeover claimed the VM: its start will take this

    def fits(self, spec: VmSpec, session: str | None) -> bool:
        """Whether a start of `spec` from the checkpoint of `session` may use this QEMU."""
        return session is not None and (self.machine, self.session) == (machine_of(spec), session) \
            and self.qemu.alive

    async def close(self) -> None:
        self.qemu.kill()
        with suppress(Exception):  # noqa: BLE001 - closing: nothing left to tell
            await self.qemu.wait()
        for relay in self.relays:
            await relay.close()
        for tap in self.taps:  # (in a thread: the agent's loop must not stall)
            await asyncio.to_thread(remove_tap, tap)


Launch = Callable[[VmSpec, str], Awaitable[WarmQemu]]


class WarmStandbys:
    """The warm QEMUs of this host (one per VM it is the level 3 partner of)."""

    def __init__(self, launch: Launch | None) -> None:
        """`launch`: starts one (agent/starts.py `launch_warm`); None: never any."""
        self._launch = launch
        self.ready: dict[str, WarmQemu] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, float] = {}  # vm -> when its launch may be tried again
        self._tasks: set[asyncio.Task[None]] = set()

    def _lock(self, vm: str) -> asyncio.Lock:
        return self._locks.setdefault(vm, asyncio.Lock())

    # --- upkeep (the partner's watch loop, every 50 ms) ----------------------------------
    def keep(self, wanted: dict[str, tuple[VmSpec, str]]) -> None:
        """`wanted`: the VMs that should have a warm QEMU now (spec, committed session).
        Launches what is missing and discards what is no longer wanted, in the background."""
        if self._launch is None:
            return
        now = time.monotonic()
        for vm, warm in list(self.ready.items()):
            want = wanted.get(vm)
            if warm.reserved_at is not None:
                if now - warm.reserved_at > RESERVE_S:
                    self._spawn(self.discard(vm, "its start did not come"))
                continue
            if not warm.qemu.alive:
                self._spawn(self.discard(vm, "its QEMU exited"))
            elif want is None:
                self._spawn(self.discard(vm, "no longer the partner of a protected session"))
            elif (machine_of(want[0]), want[1]) != (warm.machine, warm.session):
                self._spawn(self.discard(vm, "a new session or definition"))
        for vm, (spec, session) in wanted.items():
            if vm in self.ready or self._lock(vm).locked() or self._failed.get(vm, 0) > now:
                continue
            self._spawn(self._start(spec, session))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, spec: VmSpec, session: str) -> None:
        async with self._lock(spec.name):
            if spec.name in self.ready:
                return
            assert self._launch is not None
            try:
                warm = await self._launch(spec, session)
            except (QemuError, OSError) as e:
                self._failed[spec.name] = time.monotonic() + RETRY_S
                log.warning("%s: no warm standby QEMU (a takeover will start one): %s", spec.name, e)
                return
            self._failed.pop(spec.name, None)
            self.ready[spec.name] = warm
            log.info("%s: warm standby QEMU pid %d ready for session %s", spec.name, warm.qemu.pid, session)

    def reserve(self, vm: str) -> None:
        """The VM was taken over: its start is on the way (kept while other upkeep goes on)."""
        warm = self.ready.get(vm)
        if warm is not None:
            warm.reserved_at = time.monotonic()

    async def discard(self, vm: str, why: str) -> None:
        async with self._lock(vm):
            warm = self.ready.pop(vm, None)
            if warm is not None:
                log.info("%s: warm standby QEMU pid %d ended: %s", vm, warm.qemu.pid, why)
                await warm.close()

    # --- a start here ------------------------------------------------------------------------
    async def take(self, vm: str) -> WarmQemu | None:
        """A start of `vm` here: its warm QEMU, if any, is the start's from now on (to use if
        it `fits`, else to close before the start makes its own taps and sockets)."""
        async with self._lock(vm):
            return self.ready.pop(vm, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for vm in list(self.ready):
            await self.discard(vm, "the agent stops")

