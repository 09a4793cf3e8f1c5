"""`ftvm bench migration --runs N`: live migration of a loaded VM, back and forth, in a lab pool.

The VM (level 1, 256 MiB) answers a client writing a ledger record every 10 ms on one
TCP connection, while a second client keeps the guest busy with bulk disk writes. Per
run: the client's longest wait for a reply around the move (client-visible pause), the
time from the request to the VM running on the target, QEMU's own downtime figure.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from . import ops
from .cli.common import console
from .core.model import Level
from .guest.build import build_guest
from .lab import lab as labmod
from .lab import topology as topo
from .lab.scenario import LabClient, LabPool, ScenarioError, sequence_breaks
from .views import runs_on

INDEX = 60


def run_migration_bench(lab_dir: Path, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    image = build_guest(log=lambda m: None)
    state = labmod.up(2, lab_dir, probe_kernel=str(image.kernel))
    try:
        pool = LabPool(state)
        ip = topo.vm_addr(INDEX).split("/")[0]
        pool.define_ledger_vm("mover", INDEX, Level.RESTART, image, host="h1")
        pool.wait_running("mover", 60)
        pool.wait_answering(ip, 60)
        client = LabClient(state, ip, "mover", 0.01, reply_timeout=60)
        stop_load = threading.Event()

        def load() -> None:  # bulk writes keep the guest's CPU and RAM busy during the moves
            while not stop_load.is_set():
                try:
                    pool.bulk_write(ip, 8, 256)
                except ScenarioError:
                    time.sleep(0.2)

        loader = threading.Thread(target=load, daemon=True)
        results: list[dict[str, Any]] = []
        try:
            client.wait_acks(50, 30)
            loader.start()
            time.sleep(2)
            for i in range(runs):
                host = pool.snapshot().vms["mover"].owner.host  # type: ignore[union-attr]
                target = "h2" if host == "h1" else "h1"
                t0 = time.time()
                pool.run(lambda store: ops.migrate(store, "mover", target))  # noqa: B023 - run now
                pool.wait_for(f"mover on {target}", lambda snap: runs_on(snap, "mover", target), 120)  # noqa: B023
                moved = time.time() - t0
                client.wait_acks(20, 30, after=time.time())
                acks = [a for a in client.acks() if a.t > t0 - 1]
                pause = max((b.t - a.t for a, b in zip(acks, acks[1:], strict=False) if b.t > t0), default=0.0)
                ev = [e for e in pool.events() if e.vm == "mover" and e.kind == "migrate" and e.time > t0]
                m = re.search(r"QEMU downtime (\d+) ms", ev[-1].message) if ev else None
                r = {"from": host, "to": target, "client_pause_s": round(pause, 3),
                     "migration_s": round(moved, 2), "qemu_downtime_ms": int(m.group(1)) if m else None}
                results.append(r)
                progress(f"run {i + 1}: {host} -> {target}: client pause {r['client_pause_s']:.3f} s, "
                         f"request -> running on {target} {r['migration_s']:.2f} s, "
                         f"QEMU downtime {r['qemu_downtime_ms']} ms")
        finally:
            stop_load.set()
            acks = client.stop()
            loader.join(60)
        connects = sum(1 for e in client.other_events() if e.get("kind") == "connect")
        pauses = [float(r["client_pause_s"]) for r in results]
        times = [float(r["migration_s"]) for r in results]
        return {"runs": results, "connections": connects, "acknowledged": len(acks),
                "sequence_breaks": sum(sequence_breaks(acks)),
                "client_pause_median_s": statistics.median(pauses), "client_pause_max_s": max(pauses),
                "migration_median_s": statistics.median(times), "migration_max_s": max(times)}
    finally:
        labmod.down(lab_dir)


def print_migration(out: dict[str, Any]) -> None:
    t = Table(title="Live migration of a loaded level 1 VM", title_justify="left")
    for col in ("run", "from -> to", "client pause s", "request -> running s", "QEMU downtime ms"):
        t.add_column(col, justify="right")
    for i, r in enumerate(out["runs"], 1):
        t.add_row(str(i), f"{r['from']} -> {r['to']}", f"{r['client_pause_s']:.3f}", f"{r['migration_s']:.2f}",
                  str(r["qemu_downtime_ms"]))
    t.add_row("median", "", f"{out['client_pause_median_s']:.3f}", f"{out['migration_median_s']:.2f}", "")
    t.add_row("max", "", f"{out['client_pause_max_s']:.3f}", f"{out['migration_max_s']:.2f}", "")
    console.print(t)
    console.print(f"one client connection throughout: {out['connections'] == 1}; {out['acknowledged']} "
                  f"acknowledged writes, {out['sequence_breaks']} breaks in their sequence", highlight=False)


# --- control-plane cost ---------------------------------------------------------------------

def _scrape(url: str, token: str) -> dict[tuple[str, str], float]:
    """(metric, host label) -> value, from one agent's /metrics."""
    import urllib.request
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^(ftvm_(?:tick_seconds|ticks_total|etcd_requests_total))\{host="([^"]+)"\} (\S+)$',
                         text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def run_control_plane_bench(lab_dir: Path, steps: tuple[int, ...], window_s: float,
                            progress: Callable[[str], None]) -> dict[str, Any]:
    """A 4-host pool with 2 running VMs, then 10, 50... defined (stopped) VMs: what each
    agent's reconcile tick costs and how many requests the agents make to etcd."""
    from .core.model import BootSpec, Desired, DiskSpec, NicSpec, VmSpec
    image = build_guest(log=lambda m: None)
    state = labmod.up(4, lab_dir, probe_kernel=str(image.kernel))
    token = state.api_token_file.read_text().strip()
    rows = []
    try:
        pool = LabPool(state)
        for i, host in enumerate(("h1", "h2")):
            pool.define_ledger_vm(f"busy{i}", 70 + i, Level.RESTART, image, host=host)
            pool.wait_running(f"busy{i}", 60)
        defined = 0
        for n in steps:
            while defined < n:
                disk = state.shared_dir / f"idle{defined}.img"
                with open(disk, "wb") as f:
                    f.truncate(64 << 20)
                spec = VmSpec(f"idle{defined}", Level.RESTART, 256, 1, (DiskSpec(str(disk)),),
                              (NicSpec(f"52:54:00:78:{defined // 256:02x}:{defined % 256:02x}"),),
                              BootSpec(str(image.kernel), str(image.initrd), image.append),
                              desired=Desired.STOPPED)
                pool.run(lambda store: store.define_vm(spec))  # noqa: B023 - run now
                defined += 1
            time.sleep(3)
            before = {h: _scrape(state.api_url(h), token) for h in state.hosts}
            time.sleep(window_s)
            after = {h: _scrape(state.api_url(h), token) for h in state.hosts}
            per_host = {}
            for h in state.hosts:
                reqs = after[h][("ftvm_etcd_requests_total", h)] - before[h][("ftvm_etcd_requests_total", h)]
                ticks = after[h][("ftvm_ticks_total", h)] - before[h][("ftvm_ticks_total", h)]
                per_host[h] = {"etcd_requests_per_s": round(reqs / window_s, 1),
                               "ticks_per_s": round(ticks / window_s, 2),
                               "tick_ms": round(1000 * after[h][("ftvm_tick_seconds", h)], 2)}
            row = {"vms_defined": n + 2, "vms_running": 2, "hosts": len(state.hosts),
                   "etcd_requests_per_s": round(sum(p["etcd_requests_per_s"] for p in per_host.values()), 1),
                   "tick_ms_mean": round(statistics.mean(p["tick_ms"] for p in per_host.values()), 2),
                   "tick_ms_max": max(p["tick_ms"] for p in per_host.values()), "per_host": per_host}
            rows.append(row)
            progress(f"{row['vms_defined']} VMs defined: {row['etcd_requests_per_s']} etcd requests/s from 4 agents, "
                     f"tick {row['tick_ms_mean']} ms mean ({row['tick_ms_max']} ms on the busiest agent)")
    finally:
        labmod.down(lab_dir)
    return {"window_s": window_s, "steps": rows}


def print_control_plane(out: dict[str, Any]) -> None:
    t = Table(title=f"Control-plane cost of a 4-host pool (measured over {out['window_s']:g} s per step)",
              title_justify="left")
    for col in ("VMs defined", "running", "etcd req/s (4 agents)", "tick ms (mean)", "tick ms (max agent)"):
        t.add_column(col, justify="right")
    for r in out["steps"]:
        t.add_row(str(r["vms_defined"]), str(r["vms_running"]), f"{r['etcd_requests_per_s']:.1f}",
                  f"{r['tick_ms_mean']:.2f}", f"{r['tick_ms_max']:.2f}")
    console.print(t)
