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
from .core.model import Level, PoolSnapshot, RunState
from .guest.build import build_guest
from .lab import lab as labmod
from .lab import topology as topo
from .lab.scenario import LabClient, LabPool, ScenarioError, sequence_breaks

INDEX = 60


def _runs_on(snap: PoolSnapshot, host: str) -> bool:
    view = snap.vms["mover"]
    return (view.owner is not None and view.owner.host == host and view.status is not None
            and view.status.state is RunState.RUNNING)


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
                pool.wait_for(f"mover on {target}", lambda snap: _runs_on(snap, target), 120)  # noqa: B023
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
