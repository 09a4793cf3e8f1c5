"""`ftvm bench failover --level 3`: Level 3 beside Level 0 and Level 2, measured in one lab pool.

VMs with the same guest and spec (L0, L2 and L3 on h1; a second L3 VM on h3, whose
engine compares pages instead of tracking writes: `l3_tracking = "compare"`), measured
one after the other in the same run, so ratios compare like with like on a shared,
noisy machine (the L3 VM not being measured checkpoints only every 10 s meanwhile):

  * request latency p50/p99 (one connection, one request at a time);
  * closed-loop throughput and latency with 1, 8 and 32 connections;
  * Level 3 at checkpoint intervals 100, 250 and 1000 ms and with output-triggered
    epochs (the same VM, its interval changed while it runs): checkpoints/s, the pause
    and its parts (finding and reading changed RAM and disk pages, device state), dirty pages per epoch,
    the guest's run-time fraction, A-link bytes/s;
  * the pause at 256 MiB and 1 GiB of guest RAM (same load);
  * Level 3 failovers (power loss of the primary, back and forth, re-protected between):
    the client's pause, its next reply after the power loss, connection kept, records lost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from ..cli.common import console
from ..core.model import CheckpointFigures, Level
from ..guest.build import build_guest
from ..lab import lab as labmod
from ..lab import topology as topo
from ..lab.scenario import (LabClient, LabPool, closed_loop, l3_protected, level3_failover, replica_current)

# (label, VM key, checkpointing (interval ms, on output) or None)
CONFIGS: list[tuple[str, str, tuple[int, bool] | None]] = [
    ("L0", "L0", None), ("L2", "L2", None), ("L3 100 ms", "L3", (100, False)), ("L3 250 ms", "L3", (250, False)),
    ("L3 1000 ms", "L3", (1000, False)), ("L3 on output", "L3", (250, True)),
    ("L3 100 ms, compare", "L3c", (100, False)), ("L3 on output, compare", "L3c", (250, True))]
# VM key: (name, lab index, level, host)
VMS = {"L0": ("plain", 70, 0, "h1"), "L2": ("mirror", 71, 2, "h1"), "L3": ("ft", 72, 3, "h1"),
       "L3c": ("ftc", 74, 3, "h3")}
COMPARE_HOST = "h3"
IDLE_MS = 10_000  # the level 3 VM not measured checkpoints this seldom meanwhile
CONNECTIONS = (1, 8, 32)


def _ip(index: int) -> str:
    return topo.vm_addr(index).split("/")[0]


def _figures(pool: LabPool, vm: str) -> CheckpointFigures | None:
    return pool.snapshot().vms[vm].checkpoints


def _fresh_figures(pool: LabPool, vm: str) -> dict[str, Any]:
    """The engine's figures published after the load just run (they cover its last 10 s)."""
    time.sleep(2.5)
    f = _figures(pool, vm)
    return dict(f.__dict__) if f else {}


def _measure(pool: LabPool, ip: str, interval_ms: int | None, seconds: float,
             progress: Callable[[str], None]) -> dict[str, Any]:
    count = 10 if interval_ms and interval_ms >= 1000 else 30 if interval_ms and interval_ms >= 250 else 60
    lat = sorted(pool.latencies(ip, count))
    out: dict[str, Any] = {"latency_p50_ms": round(lat[len(lat) // 2] * 1000, 1),
                           "latency_p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1),
                           "latency_samples": len(lat), "closed_loop": []}
    for n in CONNECTIONS:
        r = closed_loop(ip, n, seconds)
        out["closed_loop"].append(r)
        progress(f"  {n:2d} connection(s): {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms")
    return out


def run_level3_bench(lab_dir: Path, runs: int, progress: Callable[[str], None],
                     seconds: float = 5.0) -> dict[str, Any]:
    image = build_guest(log=lambda m: None)
    state = labmod.up(3, lab_dir, probe_kernel=str(image.kernel), l3_compare_hosts=(COMPARE_HOST,))
    try:
        pool = LabPool(state)
        for name, index, level, host in VMS.values():
            pool.define_ledger_vm(name, index, Level(level), image, host=host)
        for name, index, _, _ in VMS.values():
            pool.wait_running(name, 60)
            pool.wait_answering(_ip(index), 60)
        pool.wait_for("the L2 replica in sync", replica_current("mirror"), 120)
        for key in ("L3", "L3c"):
            pool.wait_for("L3 protection", l3_protected(VMS[key][0]), 120)
        configs = []
        for label, key, l3 in CONFIGS:
            name, index, level, _ = VMS[key]
            if l3 is not None:
                other = VMS["L3c" if key == "L3" else "L3"][0]
                pool.set_checkpointing(other, IDLE_MS, False)
                pool.set_checkpointing(name, *l3)
                time.sleep(4)  # the agent follows the spec within 2 s; let the new epochs settle
            progress(f"{label}: request latency and closed-loop throughput")
            m = _measure(pool, _ip(index), l3[0] if l3 else None, seconds, progress)
            m |= {"config": label, "level": level}
            if l3 is not None:
                m["checkpoint_ms"], m["on_output"] = l3
                m["engine"] = _fresh_figures(pool, name)
                e = m["engine"]
                progress(f"  [{e.get('tracking', '?').split(':')[0]}] pause p50 {e.get('pause_p50_ms', 0):.0f} ms "
                         f"(RAM {e.get('ram_diff_p50_ms', 0):.0f}, "
                         f"disk {e.get('disk_diff_p50_ms', 0):.0f}, device state "
                         f"{e.get('device_state_p50_ms', 0):.0f}), {e.get('per_s', 0):.1f} checkpoints/s, "
                         f"guest running {100 * e.get('running_fraction', 0):.0f}% of the time")
            configs.append(m)
        base = configs[0]
        for m in configs:
            m["latency_p50_ratio"] = round(m["latency_p50_ms"] / max(base["latency_p50_ms"], 1e-3), 2)
            m["throughput_ratios"] = [round(c["requests_per_s"] / max(b["requests_per_s"], 1e-3), 3)
                                      for c, b in zip(m["closed_loop"], base["closed_loop"], strict=True)]
        pool.set_checkpointing("ft", 100, False)
        pool.set_checkpointing("ftc", IDLE_MS, False)
        sizes = _pause_by_size(pool, image, progress)
        failovers = _failovers(pool, runs, progress)
    finally:
        labmod.down(lab_dir)
    return {"configs": configs, "pause_by_ram": sizes, "failover": failovers}


def _pause_by_size(pool: LabPool, image: Any, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """The same light load (one client, a write every 20 ms) on a 256 MiB and a 1 GiB guest,
    each measured while the other checkpoints only every 10 s (they share the 2 cores)."""
    out = [_light_load_figures(pool, "ft", 72, 256, progress)]
    pool.define_ledger_vm("ftbig", 73, Level.SYSTEM, image, host="h1", memory_mib=1024)
    try:
        pool.wait_running("ftbig", 60)
        pool.wait_answering(_ip(73), 60)
        pool.wait_for("L3 protection of the 1 GiB guest", l3_protected("ftbig"), 180)
        pool.set_checkpointing("ft", 10_000, False)
        time.sleep(4)
        out.append(_light_load_figures(pool, "ftbig", 73, 1024, progress))
    finally:
        pool.set_checkpointing("ft", 100, False)
        pool.stop_and_remove("ftbig")
    return out


def _light_load_figures(pool: LabPool, name: str, index: int, mib: int,
                        progress: Callable[[str], None]) -> dict[str, Any]:
    client = LabClient(pool.state, _ip(index), f"size{mib}", 0.02, reply_timeout=60)
    try:
        time.sleep(10)
    finally:
        client.stop()
    f = _figures(pool, name)
    row = {"memory_mib": mib, **(dict(f.__dict__) if f else {})}
    progress(f"{mib} MiB guest: pause p50 {row.get('pause_p50_ms', 0):.0f} ms "
             f"(RAM {row.get('ram_diff_p50_ms', 0):.0f} ms)")
    return row


def _failovers(pool: LabPool, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    spec = pool.snapshot().vms["ft"].spec
    results = []
    for i in range(runs):
        def step(message: str, run: int = i + 1) -> None:
            progress(f"failover {run}: {message}")
        r = level3_failover(pool, spec, step, healthy_s=3)
        results.append(r)
        labmod.restore_host(pool.state, r.failed_host)
        pool.wait_for("protected again", l3_protected("ft"), 120)
    pauses = [r.pause_s for r in results]
    replies = [r.reply_after_loss_s for r in results]
    return {"runs": [r.to_json() for r in results],
            "pause_median_s": statistics.median(pauses), "pause_max_s": max(pauses),
            "reply_after_loss_median_s": statistics.median(replies), "reply_after_loss_max_s": max(replies),
            "connections_kept": sum(r.connection_kept for r in results), "lost_total": sum(r.lost for r in results),
            "seq_breaks_total": sum(r.seq_gaps + r.seq_repeats for r in results)}


def print_level3(out: dict[str, Any]) -> None:
    t = Table(title="Same guest at L0, L2, L3: requests (ratios against L0, measured in this run)",
              title_justify="left")
    for col in ("config", "p50 ms", "p99 ms", "p50 ×L0", *(f"{n} conn/s (×L0)" for n in CONNECTIONS)):
        t.add_column(col, justify="right")
    for m in out["configs"]:
        t.add_row(m["config"], f"{m['latency_p50_ms']:.1f}", f"{m['latency_p99_ms']:.1f}",
                  f"{m['latency_p50_ratio']:.1f}",
                  *(f"{c['requests_per_s']:.0f} ({r:.2f})" for c, r in zip(m["closed_loop"], m["throughput_ratios"],
                                                                          strict=True)))
    console.print(t)
    t = Table(title="Level 3 engine under that load (p50 unless noted; RAM/disk: finding and reading what "
                    "changed)", title_justify="left")
    for col in ("config", "RAM by", "pause p50/p99", "RAM", "disk", "dev state", "dirty pages", "ckpt/s",
                "guest runs"):
        t.add_column(col, justify="right")
    for m in out["configs"]:
        e = m.get("engine")
        if e:
            t.add_row(m["config"], "scan" if str(e.get("tracking", "")).startswith("exact") else "compare",
                      f"{e['pause_p50_ms']:.1f}/{e['pause_p99_ms']:.1f} ms",
                      f"{e['ram_diff_p50_ms']:.1f} ms", f"{e['disk_diff_p50_ms']:.1f} ms",
                      f"{e['device_state_p50_ms']:.0f} ms", f"{e['dirty_pages_p50']:.0f}", f"{e['per_s']:.1f}",
                      f"{100 * e['running_fraction']:.0f}%")
    console.print(t)
    for row in out["pause_by_ram"]:
        console.print(f"{row['memory_mib']:5d} MiB guest, light load: pause p50 {row.get('pause_p50_ms', 0):.0f} ms, "
                      f"RAM p50 {row.get('ram_diff_p50_ms', 0):.0f} ms", highlight=False)
    f = out["failover"]
    console.print(f"level 3 failover over {len(f['runs'])} runs: client pause median {f['pause_median_s']:.2f} s, "
                  f"max {f['pause_max_s']:.2f} s; next reply after the power loss median "
                  f"{f['reply_after_loss_median_s']:.2f} s, max {f['reply_after_loss_max_s']:.2f} s; "
                  f"connections kept {f['connections_kept']}/{len(f['runs'])}; acknowledged records lost "
                  f"{f['lost_total']}; sequence breaks {f['seq_breaks_total']}", highlight=False)


def check_failed(out: dict[str, Any]) -> bool:
    f = out["failover"]
    return f["lost_total"] > 0 or f["connections_kept"] < len(f["runs"]) or f["seq_breaks_total"] > 0


