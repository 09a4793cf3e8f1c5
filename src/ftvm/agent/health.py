"""Health probes of the VMs this host runs: one task per VM with a probe (core/health.py).

Each task probes the VM's first address from this host every `health_interval_s`. While
the VM moves (live migration, level change), is not running, or boots (grace), nothing
counts. `health_failures` failures in a row set the VM's guest failure, which the tick
turns into a GUEST_FAILED decision (agent/guest.py: restart here, or give up), exactly as
a kernel panic. The probe's traffic is the host's own: at level 3 its replies wait for a
checkpoint like every other output (a few ms).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..core.guest_failures import PROBE
from ..core.health import MAX_REPLY_LINE, HealthProbe, HealthSettings, HealthTracker, paused_because
from ..core.model import PoolSnapshot, RunState, VmSpec
from .journal import Journal
from .local import LocalRecord

log = logging.getLogger("ftvm.agent.health")


async def probe_once(probe: HealthProbe, addr: str, timeout_s: float) -> str | None:
    """One probe: None when healthy, else what failed (a short text for events)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(addr, probe.port, limit=MAX_REPLY_LINE)
            try:
                if probe.kind == "tcp":
                    return None
                host = f"[{addr}]" if ":" in addr else addr
                writer.write(f"GET {probe.path} HTTP/1.0\r\nHost: {host}:{probe.port}\r\n"
                             "User-Agent: ftvm-health\r\nConnection: close\r\n\r\n".encode())
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except ValueError:
        return f"an HTTP status line longer than {MAX_REPLY_LINE} bytes"
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return "no HTTP answer" if not line else "not an HTTP answer"
    code = int(parts[1])
    return None if 200 <= code < 400 else f"HTTP {code}"


def probe_target(spec: VmSpec) -> str | None:
    """The address a VM's probe goes to: its first NIC's."""
    for nic in spec.nics:
        if nic.ip:
            return str(ipaddress.ip_interface(nic.ip).ip)
    return None


def settings_of(spec: VmSpec) -> HealthSettings | None:
    if not spec.health:
        return None
    return HealthSettings(HealthProbe.parse(spec.health), spec.health_interval_s, spec.health_timeout_s,
                          spec.health_failures, spec.health_grace_s)


@dataclass
class _Probing:
    settings: HealthSettings
    addr: str
    task: asyncio.Task[None]
    moving: bool = False
    state: str = "grace"  # what status shows (changes rarely: each change is a store write)


class HealthProbes:
    def __init__(self, vms: dict[str, LocalRecord], journal: Journal, wake: Callable[[], None]) -> None:
        self.vms, self.journal, self.wake = vms, journal, wake
        self.probing: dict[str, _Probing] = {}
        self._no_address: set[str] = set()  # VMs with a probe but no address, as of the last sync
        self._told: set[str] = set()        # ... of which an event said so (once per VM)

    def sync(self, snapshot: PoolSnapshot, moving: set[str]) -> None:
        """After each tick: a task for each VM running here with a probe, none for the others."""
        wanted: dict[str, tuple[HealthSettings, str, bool]] = {}
        self._no_address = set()
        for name, rec in self.vms.items():
            view = snapshot.vms.get(name)
            if view is None or view.owner is None or view.owner.token != rec.token:
                continue
            settings = settings_of(view.spec)
            if settings is None:
                continue
            addr = probe_target(view.spec)
            if addr is None:
                self._no_address.add(name)
                if name not in self._told:
                    self._told.add(name)
                    self.journal.event(name, "health", f"health probe {settings.probe} is off: the VM's NIC has "
                                                       "no address (vm add --ip)")
                continue
            wanted[name] = (settings, addr, name in moving or view.migration is not None
                            or view.level_change is not None or view.handover_host is not None)
        for name in list(self.probing):
            p = self.probing[name]
            if name not in wanted or wanted[name][:2] != (p.settings, p.addr):
                p.task.cancel()
                del self.probing[name]
        for name, (settings, addr, is_moving) in wanted.items():
            if name not in self.probing:
                task = asyncio.create_task(self._run(name, settings, addr), name=f"health-{name}")
                self.probing[name] = _Probing(settings, addr, task)
            self.probing[name].moving = is_moving

    def state_of(self, name: str) -> str:
        p = self.probing.get(name)
        if p is None:
            return "off: the VM's NIC has no address" if name in self._no_address else ""
        return f"{p.settings.probe} {p.state}"

    def close(self) -> None:
        for p in self.probing.values():
            p.task.cancel()
        self.probing.clear()

    def _set_state(self, name: str, state: str) -> None:
        p = self.probing.get(name)
        if p is not None:
            p.state = state

    def _paused(self, name: str, settings: HealthSettings) -> str | None:
        rec, p = self.vms.get(name), self.probing.get(name)
        if rec is None or p is None:
            return "gone"
        return paused_because(rec.state is RunState.RUNNING and rec.guest_failure is None, p.moving,
                              time.monotonic() - rec.guest_booted, settings.grace_s)

    async def _run(self, name: str, settings: HealthSettings, addr: str) -> None:
        tracker = HealthTracker(settings.failures)
        while True:
            await asyncio.sleep(settings.interval_s)
            paused = self._paused(name, settings)
            if paused:
                tracker.pause()
                self._set_state(name, "grace" if paused.startswith("grace") else f"paused: {paused}")
                continue
            t0 = time.monotonic()
            error = await probe_once(settings.probe, addr, settings.timeout_s)
            paused = self._paused(name, settings)
            if paused:  # it began to move, or failed otherwise, meanwhile
                tracker.pause()
                continue
            first_failure = error is not None and tracker.in_a_row == 0
            verdict = tracker.record(error)
            self._set_state(name, "ok" if error is None else "failed: guest restart asked" if verdict else
                            f"failing ({tracker.in_a_row} of {settings.failures}): {error}")
            if first_failure:  # (with `failures` 1, the verdict has already reset the count)
                self.journal.event(name, "health", f"health probe {settings.probe} of {addr} failed "
                                                   f"({error}); the guest is restarted after "
                                                   f"{settings.failures} in a row")
            rec = self.vms.get(name)
            if verdict is not None and rec is not None:
                log.info("%s: health probe failed %d times (%.2f s for the last)", name, settings.failures,
                         time.monotonic() - t0)
                rec.guest_failure = f"{PROBE}: {verdict}"
                self.wake()
