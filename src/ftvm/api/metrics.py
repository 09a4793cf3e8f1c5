"""Prometheus metrics for one agent's view of the pool (pure: snapshot in, text out).

Naming follows Prometheus conventions: `ftvm_` prefix, base units (seconds, bytes),
`_total` for counters, `_info` for labels carried by a constant 1. Pool-wide gauges
(every VM, every host) are the same from every agent; scrape one agent, or all and
aggregate with `max by (vm)`. Counters are this agent's since it started.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..core.model import Level, PoolSnapshot, RunState
from ..core.protection import protection
from ..core.replication import CopyState
from ..views import dr_row


@dataclass
class AgentCounters:
    """What this agent did since it started (counters: monotonic)."""

    failovers: dict[str, int] = field(default_factory=dict)    # VM taken over from a lost host, here
    migrations: dict[str, int] = field(default_factory=dict)   # VM moved here live
    checkpoints: dict[str, int] = field(default_factory=dict)  # level 3 checkpoints taken here
    guest_failures: dict[str, int] = field(default_factory=dict)  # the guest failed on its own, here
    fences: int = 0                                              # VMs killed by the fence guard
    loop_errors: int = 0                                         # unexpected errors the agent's loops survived


@dataclass(frozen=True)
class AgentHealth:
    host: str
    quorum_reachable: bool
    lease_ttl_s: float
    lease_remaining_s: float   # before the fence guard kills this host's VMs
    tick_seconds: float = 0.0  # mean duration of the agent's recent reconcile ticks
    ticks: int = 0             # ticks since the agent started (a counter)
    etcd_requests: int = 0     # requests to etcd since the agent started (a counter)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, float(value)))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            text = repr(value) if value != int(value) else str(int(value))
            yield f"{self.name}{_labels(labels)} {text}"


def render(snapshot: PoolSnapshot, health: AgentHealth, counters: AgentCounters) -> str:
    families: dict[str, _Family] = {}

    def fam(name: str, kind: str, help_text: str) -> _Family:
        if name not in families:
            families[name] = _Family(name, kind, help_text)
        return families[name]

    fam("ftvm_quorum_reachable", "gauge", "1 if this agent reaches the quorum service (etcd)").add(
        health.quorum_reachable, host=health.host)
    fam("ftvm_lease_ttl_seconds", "gauge", "TTL of this host's lease").add(health.lease_ttl_s, host=health.host)
    fam("ftvm_lease_remaining_seconds", "gauge",
        "time before this host's VMs are self-fenced unless the lease is renewed").add(
        max(0.0, health.lease_remaining_s), host=health.host)
    fam("ftvm_tick_seconds", "gauge", "mean duration of the agent's recent reconcile ticks").add(
        health.tick_seconds, host=health.host)
    fam("ftvm_ticks_total", "counter", "reconcile ticks this agent ran").add(health.ticks, host=health.host)
    fam("ftvm_etcd_requests_total", "counter", "requests this agent made to etcd").add(
        health.etcd_requests, host=health.host)
    fam("ftvm_fences_total", "counter", "VMs this agent killed because its lease could not be renewed").add(
        counters.fences, host=health.host)
    fam("ftvm_agent_loop_errors_total", "counter",
        "unexpected errors the agent's loops survived (each is in the agent log)").add(
        counters.loop_errors, host=health.host)
    fam("ftvm_records_unreadable", "gauge", "values in the store no agent can read (see events)").add(
        len(snapshot.bad), host=health.host)
    for h, info in sorted(snapshot.hosts.items()):
        fam("ftvm_host_up", "gauge", "1 for every host holding a live lease").add(1, host=h)
        fam("ftvm_host_memory_bytes", "gauge", "memory a host offers to VMs").add(info.memory_mib << 20, host=h)
        fam("ftvm_host_memory_used_bytes", "gauge",
            "memory of the VMs a host runs and of the level 3 RAM replicas it keeps").add(
            snapshot.used_memory(h) << 20, host=h)
        fam("ftvm_host_vcpus", "gauge", "vCPUs a host offers to VMs").add(info.vcpus, host=h)
        fam("ftvm_host_vcpus_used", "gauge", "vCPUs of the VMs a host owns").add(snapshot.used_vcpus(h), host=h)
    for name, view in sorted(snapshot.vms.items()):
        spec = view.spec
        running = view.status is not None and view.status.state is RunState.RUNNING
        host = view.owner.host if view.owner else ""
        fam("ftvm_vm_info", "gauge", "a defined VM: level, host running it, desired state").add(
            1, vm=name, level=str(int(spec.level)), host=host, desired=spec.desired.value,
            state=view.status.state.value if view.status else "stopped")
        fam("ftvm_vm_level", "gauge", "protection level (0-3)").add(int(spec.level), vm=name)
        fam("ftvm_vm_running", "gauge", "1 if the VM runs").add(running, vm=name)
        fam("ftvm_vm_protected", "gauge", "1 if the VM is protected at its level right now").add(
            protection(snapshot, view).protected, vm=name)
        if running and view.status is not None and view.status.health:
            fam("ftvm_vm_health_ok", "gauge", "1 if the VM's last health probe passed (0: failing, paused "
                "or in its grace after boot)").add(view.status.health.endswith(" ok"), vm=name)
        if view.copies is not None:
            for h, c in sorted(view.copies.copies.items()):
                fam("ftvm_vm_copy_current", "gauge", "1 if the host's copy of the VM's disks is current").add(
                    c.state is CopyState.CURRENT, vm=name, host=h, state=c.state.value)
            fam("ftvm_vm_copies_generation", "gauge", "generation of the copies record").add(
                view.copies.gen, vm=name)
        if view.sync is not None:
            fam("ftvm_vm_resync_done_bytes", "gauge", "bytes copied by the resync under way").add(
                view.sync.done, vm=name, host=view.sync.host)
            fam("ftvm_vm_resync_total_bytes", "gauge", "bytes the resync under way has to copy").add(
                view.sync.total, vm=name, host=view.sync.host)
            fam("ftvm_vm_out_of_sync_bytes", "gauge", "bytes the partner's copy still lacks").add(
                max(0, view.sync.total - view.sync.done), vm=name, host=view.sync.host)
        dr = dr_row(view, time.time())
        if dr is not None:
            fam("ftvm_vm_dr_rpo_seconds", "gauge", "the RPO target of the VM's DR replication").add(
                dr["rpo_s"], vm=name, target=dr["target"])
            if dr["lag_s"] is not None:
                fam("ftvm_vm_dr_lag_seconds", "gauge", "now minus the cut of the newest point at the DR site").add(
                    dr["lag_s"], vm=name, target=dr["target"])
            fam("ftvm_vm_dr_point", "gauge", "the newest recovery point at the DR site (its number)").add(
                dr["newest"], vm=name, target=dr["target"])
            fam("ftvm_vm_dr_sent_bytes", "gauge", "bytes this owner sent to the DR site (compressed)").add(
                dr["sent_bytes"], vm=name, target=dr["target"])
            fam("ftvm_vm_dr_written_bytes", "gauge", "disk bytes this owner shipped to the DR site").add(
                dr["written_bytes"], vm=name, target=dr["target"])
        c3 = view.checkpoints
        if spec.level is Level.SYSTEM and c3 is not None:
            fam("ftvm_vm_checkpoints_per_second", "gauge", "level 3 checkpoints per second (last 10 s)").add(
                c3.per_s, vm=name)
            pause = fam("ftvm_vm_checkpoint_pause_seconds", "gauge",
                        "guest pause per checkpoint, quantiles over the last 10 s")
            pause.add(c3.pause_p50_ms / 1000, vm=name, quantile="0.5")
            pause.add(c3.pause_p99_ms / 1000, vm=name, quantile="0.99")
            fam("ftvm_vm_checkpoint_dirty_pages", "gauge", "RAM pages per checkpoint (median, last 10 s)").add(
                c3.dirty_pages_p50, vm=name)
            fam("ftvm_vm_checkpoint_link_bytes_per_second", "gauge", "checkpoint stream bytes per second").add(
                c3.link_bytes_per_s, vm=name)
            fam("ftvm_vm_guest_running_ratio", "gauge", "share of the time the guest ran (not paused)").add(
                c3.running_fraction, vm=name)
            fam("ftvm_vm_checkpoint_epoch", "gauge", "last checkpoint acknowledged by the partner").add(
                c3.epoch, vm=name)
            fam("ftvm_vm_checkpoint_exact_tracking", "gauge",
                "1: changed RAM pages come from the kernel's write tracking; 0: from a page compare").add(
                1 if c3.tracking.startswith("exact") else 0, vm=name)
            fam("ftvm_vm_checkpoint_full_resyncs", "gauge",
                "checkpoints that sent all of RAM after a failed dirty-page scan (this session)").add(
                c3.full_resyncs, vm=name)
    for kind, per_vm, help_text in (
            ("failovers", counters.failovers, "VMs this agent took over from a lost host"),
            ("migrations", counters.migrations, "VMs live-migrated to this host"),
            ("checkpoints", counters.checkpoints, "level 3 checkpoints this agent took"),
            ("guest_failures", counters.guest_failures,
             "guest failures on this host (kernel panic, watchdog, health probe), restarted or not")):
        f = fam(f"ftvm_{kind}_total", "counter", help_text)
        for vm, n in sorted(per_vm.items()):
            f.add(n, vm=vm, host=health.host)
    return "\n".join(line for f in families.values() for line in f.lines()) + "\n"
