"""`ftvm bench migration --runs N`: live migration of a loaded VM, back and forth, in a lab
pool, at levels 1, 2 and 3 side by side in one run (one VM at a time, same lab).

Each VM (256 MiB) answers a client writing a ledger record every 10 ms on one TCP
connection, while a second client keeps the guest busy with bulk disk writes. Per run:
the client's longest wait for a reply around the move (client-visible pause), the time
from the request to the VM running on the target, QEMU's downtime figure (levels 1-2;
level 3 moves by a switchover from a final checkpoint, no migration stream), and, for
levels 2 and 3, the time until the VM is protected again (level 2: the old host's copy
resynced from the bitmap; level 3: a new pre-copy to the old host).
"""

from __future__ import annotations

import re
import ssl
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from .. import ops
from ..cli.common import console
from ..core.model import Level, PoolSnapshot
from ..core.protection import protection
from ..guest.build import GuestImage, build_guest
from ..lab import lab as labmod
from ..lab import topology as topo
from ..lab.scenario import LabClient, LabPool, ScenarioError, sequence_breaks
from ..views import runs_on

INDEX = 60
LEVELS = (Level.RESTART, Level.COMPONENT, Level.SYSTEM)


def run_migration_bench(lab_dir: Path, runs: int, progress: Callable[[str], None],
                        levels: tuple[Level, ...] = LEVELS) -> dict[str, Any]:
    image = build_guest(log=lambda m: None)
    state = labmod.up(2, lab_dir, probe_kernel=str(image.kernel))
    try:
        pool = LabPool(state)
        out: dict[str, Any] = {"runs_per_level": runs, "levels": {}}
        for i, level in enumerate(levels):
            out["levels"][str(int(level))] = _bench_level(pool, image, level, INDEX + i, runs, progress)
        return out
    finally:
        labmod.down(lab_dir)


def _protected(vm: str) -> Callable[[PoolSnapshot], bool]:
    def check(snap: PoolSnapshot) -> bool:
        view = snap.vms.get(vm)
        return view is not None and view.owner is not None and protection(snap, view).protected
    return check


def _bench_level(pool: LabPool, image: GuestImage, level: Level, index: int, runs: int,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    name = f"mover{int(level)}"
    ip = topo.vm_addr(index).split("/")[0]
    pool.define_ledger_vm(name, index, level, image, host="h1")
    try:
        pool.wait_running(name, 60)
        pool.wait_answering(ip, 60)
        if level.has_copies:
            pool.wait_for(f"{name} protected", _protected(name), 120)
        client = LabClient(pool.state, ip, name, 0.01, reply_timeout=60)
        stop_load = threading.Event()

        def load() -> None:  # bulk writes keep the guest's CPU, RAM and disk busy during the moves
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
                host = pool.snapshot().vms[name].owner.host  # type: ignore[union-attr]
                target = "h2" if host == "h1" else "h1"
                t0 = time.time()
                pool.run(lambda store: ops.migrate(store, name, target))  # noqa: B023 - run now
                pool.wait_for(f"{name} on {target}", lambda snap: runs_on(snap, name, target), 120)  # noqa: B023
                moved = time.time() - t0
                reprotect = None
                if level.has_copies:
                    pool.wait_for(f"{name} protected again", _protected(name), 120)
                    reprotect = round(time.time() - t0, 2)
                client.wait_acks(20, 30, after=time.time())
                acks = [a for a in client.acks() if a.t > t0 - 1]
                pause = max((b.t - a.t for a, b in zip(acks, acks[1:], strict=False) if b.t > t0), default=0.0)
                ev = [e for e in pool.events() if e.vm == name and e.kind == "migrate" and e.time > t0]
                m = re.search(r"QEMU downtime (\d+) ms", ev[-1].message) if ev else None
                r = {"from": host, "to": target, "client_pause_s": round(pause, 3),
                     "migration_s": round(moved, 2), "qemu_downtime_ms": int(m.group(1)) if m else None,
                     "protected_again_s": reprotect}
                results.append(r)
                progress(f"level {int(level)} run {i + 1}: {host} -> {target}: client pause "
                         f"{r['client_pause_s']:.3f} s, request -> running {r['migration_s']:.2f} s"
                         + (f", QEMU downtime {r['qemu_downtime_ms']} ms" if m else "")
                         + (f", protected again after {reprotect:.1f} s" if reprotect is not None else ""))
        finally:
            stop_load.set()
            acks = client.stop()
            loader.join(60)
        connects = sum(1 for e in client.other_events() if e.get("kind") == "connect")
        pauses = [float(r["client_pause_s"]) for r in results]
        times = [float(r["migration_s"]) for r in results]
        again = [float(r["protected_again_s"]) for r in results if r["protected_again_s"] is not None]
        return {"runs": results, "connections": connects, "acknowledged": len(acks),
                "sequence_breaks": sum(sequence_breaks(acks)),
                "client_pause_median_s": statistics.median(pauses), "client_pause_max_s": max(pauses),
                "migration_median_s": statistics.median(times), "migration_max_s": max(times),
                "protected_again_median_s": statistics.median(again) if again else None}
    finally:
        pool.stop_and_remove(name)


def migration_failed(out: dict[str, Any]) -> bool:
    return any(r["connections"] != 1 or r["sequence_breaks"] != 0 for r in out["levels"].values())


def print_migration(out: dict[str, Any]) -> None:
    t = Table(title="Live migration of a loaded VM (256 MiB, client every 10 ms + bulk disk writes)",
              title_justify="left")
    for col in ("level", "run", "from -> to", "client pause s", "request -> running s", "QEMU downtime ms",
                "protected again s"):
        t.add_column(col, justify="right")
    for level, fig in out["levels"].items():
        for i, r in enumerate(fig["runs"], 1):
            t.add_row(level, str(i), f"{r['from']} -> {r['to']}", f"{r['client_pause_s']:.3f}",
                      f"{r['migration_s']:.2f}", "-" if r["qemu_downtime_ms"] is None else str(r["qemu_downtime_ms"]),
                      "-" if r["protected_again_s"] is None else f"{r['protected_again_s']:.1f}")
        t.add_row(level, "median", "", f"{fig['client_pause_median_s']:.3f}", f"{fig['migration_median_s']:.2f}",
                  "", "-" if fig["protected_again_median_s"] is None else f"{fig['protected_again_median_s']:.1f}")
        t.add_row(level, "max", "", f"{fig['client_pause_max_s']:.3f}", f"{fig['migration_max_s']:.2f}", "", "")
    console.print(t)
    base = out["levels"].get("1")
    for level, fig in out["levels"].items():
        ratio = (f", pause {fig['client_pause_median_s'] / base['client_pause_median_s']:.1f} x level 1"
                 if base and level != "1" and base["client_pause_median_s"] > 0 else "")
        console.print(f"level {level}: one client connection throughout: {fig['connections'] == 1}; "
                      f"{fig['acknowledged']} acknowledged writes, {fig['sequence_breaks']} breaks in their "
                      f"sequence{ratio}", highlight=False)


# --- control-plane cost ---------------------------------------------------------------------

def _scrape(url: str, token: str, tls: ssl.SSLContext) -> dict[tuple[str, str], float]:
    """(metric, host label) -> value, from one agent's /metrics."""
    import urllib.request
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5, context=tls) as r:
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
    from ..core.model import BootSpec, Desired, DiskSpec, NicSpec, VmSpec
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
            before = {h: _scrape(state.api_url(h), token, state.https()) for h in state.hosts}
            time.sleep(window_s)
            after = {h: _scrape(state.api_url(h), token, state.https()) for h in state.hosts}
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
