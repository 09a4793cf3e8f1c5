"""`ftvm bench failover --level 3`: the level 3 engine beside level 0 and level 2, and its
two ways of finding what changed (tracking writes vs comparing pages), in one run.

Part 1, a 3-host lab whose h3 compares pages (`l3_tracking = "compare"`); everything is
measured one VM after the other in the same run, so ratios compare like with like on a
shared, noisy machine (a level 3 VM not being measured checkpoints only every 10 s):

  * the same guest at L0, L2 and L3 on h1 and at L3 on h3 (compare): request latency
    p50/p99 on one connection (one request at a time), closed-loop throughput with 1, 8
    and 32 connections as ratios to L0, and the engine under that load (the pause p50/p99
    and its parts, cont-to-ACK, dirty pages, checkpoints/s, the share of time the guest
    ran), with the default output-triggered epochs and at a 100 ms interval;
  * the same for a 2-vCPU guest, both engines;
  * the pause and its parts by size: 256 MiB and 2 GiB of RAM, 64 MiB and 20 GiB
    (sparse) disks, both engines, under the same light load (one client, a write every
    20 ms).

Part 2, a 2-host lab (both hosts track writes): power losses of the primary at each size,
back and forth, re-protected between: the client's next reply after the power loss, its
connection kept, acknowledged records lost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from ..cli.common import console
from ..core.model import CheckpointFigures, Level, VmSpec
from ..guest.build import GuestImage, build_guest
from ..lab import lab as labmod
from ..lab import topology as topo
from ..lab.scenario import (LabClient, LabPool, ScenarioError, closed_loop, l3_protected, level3_failover,
                            replica_current)

# (label, VM key, checkpointing (interval ms, on output) or None)
CONFIGS: list[tuple[str, str, tuple[int, bool] | None]] = [
    ("L0", "L0", None), ("L2", "L2", None),
    ("L3 tracking", "L3", (100, True)), ("L3 compare", "L3c", (100, True)),
    ("L3 tracking, 100 ms", "L3", (100, False)), ("L3 compare, 100 ms", "L3c", (100, False))]
# VM key: (name, lab index, level, host, vCPUs)
VMS = {"L0": ("plain", 70, 0, "h1", 1), "L2": ("mirror", 71, 2, "h1", 1), "L3": ("ft", 72, 3, "h1", 1),
       "L3c": ("ftc", 74, 3, "h3", 1)}
TWO_VCPU = {"L3": ("ft2", 75, 3, "h1", 2), "L3c": ("ftc2", 76, 3, "h3", 2)}
COMPARE_HOST = "h3"
COLD_HOST = "h1"  # the failover lab's host that starts a partner's QEMU only at the takeover
IDLE_MS = 10_000  # a level 3 VM not being measured checkpoints this seldom meanwhile
CONNECTIONS = (1, 8, 32)
# (RAM MiB, disk bytes)
SIZES = [(256, 64 << 20), (2048, 64 << 20), (256, 20 << 30), (2048, 20 << 30)]
HOST_MEMORY_MIB = 16384
HOST_VCPUS = 16  # every VM of a part on its intended host (4 vCPUs put a 2-vCPU guest on another engine's host)
# the compare engine reads every page of every disk in every epoch: at 20 GiB ~3 s, past
# l3_checkpoint_stall (the partner would take the VM over); that is what bitmaps are for
COMPARE_MAX_DISK = 1 << 30
PROTECT_S = 300  # a 2 GiB guest's first copy under a compare engine takes a while


def _ip(index: int) -> str:
    return topo.vm_addr(index).split("/")[0]


def _figures(pool: LabPool, vm: str) -> CheckpointFigures | None:
    return pool.snapshot().vms[vm].checkpoints


def _engine(pool: LabPool, vm: str) -> dict[str, Any]:
    """The engine's figures published after the load just run (they cover its last 10 s)."""
    time.sleep(2.5)
    f = _figures(pool, vm)
    return dict(f.__dict__) if f else {}


def _labelled(label: str, engine: dict[str, Any]) -> str:
    """`label`, or, if the VM ran with the other engine than it says (placed on another
    host), the label with the engine it ran with: a figure never stands under a wrong name."""
    compared = str(engine.get("tracking", "")).startswith("page compare")
    if not engine or compared == ("compare" in label):
        return label
    return f"{label} [ran with {'compare' if compared else 'tracking'}!]"


def _settle(pool: LabPool, vm: str, others: list[str], l3: tuple[int, bool]) -> None:
    for other in others:
        pool.set_checkpointing(other, IDLE_MS, False)
    pool.set_checkpointing(vm, *l3)
    time.sleep(4)  # the agent follows the spec within 2 s; let the new epochs settle


def _measure(pool: LabPool, ip: str, seconds: float, progress: Callable[[str], None]) -> dict[str, Any]:
    lat = sorted(pool.latencies(ip, 100))
    out: dict[str, Any] = {"latency_p50_ms": round(lat[len(lat) // 2] * 1000, 1),
                           "latency_p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1),
                           "latency_samples": len(lat), "closed_loop": []}
    progress(f"  one connection: p50 {out['latency_p50_ms']} ms, p99 {out['latency_p99_ms']} ms")
    for n in CONNECTIONS:
        r = closed_loop(ip, n, seconds)
        out["closed_loop"].append(r)
        progress(f"  {n:2d} connection(s): {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms")
    return out


def _engine_line(e: dict[str, Any]) -> str:
    return (f"pause p50 {e.get('pause_p50_ms', 0):.1f} ms (RAM {e.get('ram_diff_p50_ms', 0):.1f}, "
            f"disk {e.get('disk_diff_p50_ms', 0):.1f}, device state {e.get('device_state_p50_ms', 0):.1f}), "
            f"ACK {e.get('ack_p50_ms', 0):.1f} ms after, {e.get('per_s', 0):.0f} checkpoints/s, "
            f"guest running {100 * e.get('running_fraction', 0):.0f}%; output held -> checkpoint "
            f"{e.get('output_wait_p50_ms', 0):.1f} ms, release -> next output {e.get('reply_p50_ms', 0):.1f} ms, "
            f"{e.get('frames_p50', 0):.0f} frames per release")


def _define(pool: LabPool, image: GuestImage, vm: tuple[str, int, int, str, int], memory_mib: int = 256,
            disk_size: int = 64 << 20) -> VmSpec:
    name, index, level, host, vcpus = vm
    return pool.define_ledger_vm(name, index, Level(level), image, host=host, vcpus=vcpus, memory_mib=memory_mib,
                                 disk_size=disk_size)


def _wait_up(pool: LabPool, specs: list[VmSpec]) -> None:
    for spec in specs:
        pool.wait_running(spec.name, 120)
        pool.wait_answering(_ip_of(spec), 120)
    for spec in specs:
        if spec.level is Level.SYSTEM:
            pool.wait_for(f"level 3 protection of {spec.name}", l3_protected(spec.name), PROTECT_S)
        elif spec.level is Level.COMPONENT:
            pool.wait_for(f"the replica of {spec.name} in sync", replica_current(spec.name), PROTECT_S)


def _ip_of(spec: VmSpec) -> str:
    return (spec.nics[0].ip or "").split("/")[0]


PARTS = ("requests", "sizes", "failover")


def run_level3_bench(lab_dir: Path, runs: int, progress: Callable[[str], None],
                     seconds: float = 5.0, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """`parts`: what to measure (all by default: the figures side by side in one run)."""
    image = build_guest(log=lambda m: None)
    out: dict[str, Any] = {"configs": [], "two_vcpus": [], "pause_by_size": [], "failover": [], "errors": [],
                           "parts": list(parts)}

    def part(key: str, run: Callable[[], Any]) -> bool:
        """One part's figures; a part that fails is reported, and what came before is kept."""
        try:
            out[key] = run()
            return True
        except (ScenarioError, labmod.LabError, OSError, RuntimeError) as e:
            out["errors"].append(f"{key}: {type(e).__name__}: {e}")
            progress(f"{key} failed: {e}")
            return False
    if "requests" in parts or "sizes" in parts:
        state = labmod.up(3, lab_dir, probe_kernel=str(image.kernel), l3_compare_hosts=(COMPARE_HOST,),
                          host_memory_mib=HOST_MEMORY_MIB, host_vcpus=HOST_VCPUS)
        try:
            pool = LabPool(state)
            ok = True
            if "requests" in parts:
                _wait_up(pool, [_define(pool, image, vm) for vm in VMS.values()])
                ok = part("configs", lambda: _requests(pool, seconds, progress))
                if ok:
                    pool.set_checkpointing("ft", IDLE_MS, False)
                    pool.set_checkpointing("ftc", IDLE_MS, False)
                    ok = part("two_vcpus", lambda: _two_vcpus(pool, image, seconds, progress))
            if ok and "sizes" in parts:
                part("pause_by_size", lambda: _pause_by_size(pool, image, progress))
        finally:
            labmod.down(lab_dir)
    if "failover" in parts:
        state = labmod.up(2, lab_dir, probe_kernel=str(image.kernel), host_memory_mib=HOST_MEMORY_MIB,
                          host_vcpus=HOST_VCPUS, l3_cold_hosts=(COLD_HOST,))
        try:
            part("failover", lambda: _failovers(LabPool(state), image, runs, progress))
        finally:
            labmod.down(lab_dir)
    return out


def _requests(pool: LabPool, seconds: float, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    configs = []
    for label, key, l3 in CONFIGS:
        name, index, level, _, _ = VMS[key]
        if l3 is not None:
            _settle(pool, name, [VMS["L3c" if key == "L3" else "L3"][0]], l3)
        progress(f"{label}: request latency and closed-loop throughput")
        m = _measure(pool, _ip(index), seconds, progress)
        m |= {"config": label, "level": level}
        if l3 is not None:
            m["checkpoint_ms"], m["on_output"] = l3
            m["engine"] = _engine(pool, name)
            m["config"] = _labelled(label, m["engine"])
            progress("  " + _engine_line(m["engine"]))
        configs.append(m)
    _ratios(configs, configs[0])
    return configs


def _ratios(rows: list[dict[str, Any]], base: dict[str, Any]) -> None:
    for m in rows:
        m["latency_p50_ratio"] = round(m["latency_p50_ms"] / max(base["latency_p50_ms"], 1e-3), 2)
        m["throughput_ratios"] = [round(c["requests_per_s"] / max(b["requests_per_s"], 1e-3), 3)
                                  for c, b in zip(m["closed_loop"], base["closed_loop"], strict=True)]


def _two_vcpus(pool: LabPool, image: GuestImage, seconds: float,
               progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """A 2-vCPU guest at L3 with either engine, beside a 2-vCPU guest at L0 (its base)."""
    base_vm = ("plain2", 77, 0, "h1", 2)
    specs = [_define(pool, image, vm) for vm in (base_vm, *TWO_VCPU.values())]
    rows = []
    try:
        _wait_up(pool, specs)
        for label, vm in (("L0, 2 vCPUs", base_vm), ("L3 tracking, 2 vCPUs", TWO_VCPU["L3"]),
                          ("L3 compare, 2 vCPUs", TWO_VCPU["L3c"])):
            name, index, level, _, _ = vm
            if level == 3:
                _settle(pool, name, [v[0] for v in TWO_VCPU.values() if v[0] != name], (100, True))
            progress(f"{label}: request latency and closed-loop throughput")
            m = _measure(pool, _ip(index), seconds, progress) | {"config": label, "level": level}
            if level == 3:
                m["engine"] = _engine(pool, name)
                m["config"] = _labelled(label, m["engine"])
                progress("  " + _engine_line(m["engine"]))
            rows.append(m)
        _ratios(rows, rows[0])
    finally:
        for spec in specs:
            pool.stop_and_remove(spec.name)
    return rows


def _pause_by_size(pool: LabPool, image: GuestImage, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each size on both engines, each measured under the same light load while the other
    checkpoints every 10 s."""
    rows = []
    for memory_mib, disk_size in SIZES:
        twins = {"tracking": ("szt", 78, 3, "h1", 1), "compare": ("szc", 79, 3, COMPARE_HOST, 1)}
        if disk_size > COMPARE_MAX_DISK:
            rows.append({"engine": "compare", "memory_mib": memory_mib, "disk_gib": round(disk_size / 2**30, 3),
                         "error": f"not run: a compare reads all {disk_size >> 30} GiB each epoch (~0.15 ms/MiB)"})
            del twins["compare"]
        specs = [_define(pool, image, vm, memory_mib, disk_size) for vm in twins.values()]
        try:
            failed = {}
            for engine, vm in twins.items():  # both up before either is idled: a twin idled while it
                try:                          # boots holds its replies 10 s and never answers
                    _wait_up(pool, [spec for spec in specs if spec.name == vm[0]])
                except ScenarioError as e:  # said, not fatal
                    failed[engine] = str(e)
            for engine, vm in twins.items():
                if engine in failed:
                    progress(f"{memory_mib} MiB RAM, {disk_size >> 20} MiB disk, {engine}: not measured: "
                             f"{failed[engine]}")
                    rows.append({"engine": engine, "memory_mib": memory_mib, "disk_gib": round(disk_size / 2**30, 3),
                                 "error": failed[engine], **_engine(pool, vm[0])})
                    continue
                _settle(pool, vm[0], [v[0] for v in twins.values() if v[0] != vm[0]], (100, True))
                client = LabClient(pool.state, _ip(vm[1]), f"size-{engine}", 0.02, reply_timeout=120)
                try:
                    time.sleep(10)
                finally:
                    client.stop()
                row = {"engine": engine, "memory_mib": memory_mib, "disk_gib": round(disk_size / 2**30, 3),
                       **_engine(pool, vm[0])}
                progress(f"{memory_mib} MiB RAM, {disk_size >> 20} MiB disk, {engine}: {_engine_line(row)}")
                rows.append(row)
        finally:
            for spec in specs:
                pool.stop_and_remove(spec.name)
    return rows


def _failovers(pool: LabPool, image: GuestImage, runs: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Power losses of the primary at each size, back and forth: h1 -> h2 resumes in h2's
    QEMU started ahead (agent/warm.py), h2 -> h1 in a QEMU h1 starts at the takeover
    (`COLD_HOST`), side by side. `runs` of each at 256 MiB, two of each at larger sizes."""
    out = []
    for memory_mib, disk_size in SIZES:
        spec = _define(pool, image, ("fo", 80, 3, "h1", 1), memory_mib, disk_size)
        results = []
        size = f"{memory_mib} MiB / {disk_size >> 20} MiB"
        try:
            _wait_up(pool, [spec])
            for i in range(2 * (runs if (memory_mib, disk_size) == SIZES[0] else 2)):
                def step(message: str, run: int = i + 1, size: str = size) -> None:
                    progress(f"{size}, failover {run}: {message}")
                # resumed in a QEMU started ahead unless the partner (the other host) is COLD_HOST
                warm = pool.wait_running("fo", 60) == COLD_HOST
                r = level3_failover(pool, spec, step, healthy_s=3, warm=warm)
                results.append(r)
                labmod.restore_host(pool.state, r.failed_host)
                pool.wait_for("protected again", l3_protected("fo"), PROTECT_S)
        finally:
            pool.stop_and_remove("fo")
        row: dict[str, Any] = {"memory_mib": memory_mib, "disk_gib": round(disk_size / 2**30, 3),
                               "runs": [r.to_json() for r in results]}
        for kind, rs in (("warm", [r for r in results if r.resumed_in_warm_qemu]),
                         ("cold", [r for r in results if not r.resumed_in_warm_qemu])):
            replies = [r.reply_after_loss_s for r in rs]
            row[kind] = {"runs": len(rs), "reply_after_loss_median_s": statistics.median(replies) if rs else None,
                         "reply_after_loss_max_s": max(replies) if rs else None,
                         "takeover_median_s": statistics.median(r.takeover_s for r in rs) if rs else None}
        row |= {"pause_median_s": statistics.median(r.pause_s for r in results),
                "connections_kept": sum(r.connection_kept for r in results),
                "lost_total": sum(r.lost for r in results),
                "seq_breaks_total": sum(r.seq_gaps + r.seq_repeats for r in results),
                "max_copies": max(r.max_copies for r in results)}
        out.append(row)
    return out


def _request_table(title: str, rows: list[dict[str, Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("config", "p50 ms", "p99 ms", "p50 ×L0", *(f"{n} conn/s (×L0)" for n in CONNECTIONS),
                "guest runs"):
        t.add_column(col, justify="right")
    for m in rows:
        e = m.get("engine") or {}
        t.add_row(m["config"], f"{m['latency_p50_ms']:.1f}", f"{m['latency_p99_ms']:.1f}",
                  f"{m['latency_p50_ratio']:.1f}",
                  *(f"{c['requests_per_s']:.0f} ({r:.2f})" for c, r in zip(m["closed_loop"], m["throughput_ratios"],
                                                                          strict=True)),
                  f"{100 * e['running_fraction']:.0f}%" if e else "")
    return t


def _engine_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("", "pause p50/p99 ms", "stop", "RAM", "disk", "dev state", "cont", "ACK after", "dirty pages",
                "ckpt/s", "guest runs", "silence"):
        t.add_column(col, justify="right")
    for label, e in rows:
        if not e.get("per_s"):
            t.add_row(label, str(e.get("error") or e.get("reason") or "no figures")[:60], *([""] * 10))
            continue
        t.add_row(label, f"{e['pause_p50_ms']:.1f}/{e['pause_p99_ms']:.1f}", f"{e.get('stop_p50_ms', 0):.1f}",
                  f"{e['ram_diff_p50_ms']:.1f}", f"{e['disk_diff_p50_ms']:.1f}", f"{e['device_state_p50_ms']:.1f}",
                  f"{e.get('cont_p50_ms', 0):.1f}", f"{e.get('ack_p50_ms', 0):.1f}", f"{e['dirty_pages_p50']:.0f}",
                  f"{e['per_s']:.0f}", f"{100 * e['running_fraction']:.0f}%",
                  f"{e.get('partner_silence_max_ms', 0):.0f}")
    return t


def print_level3(out: dict[str, Any]) -> None:
    if out["configs"]:
        console.print(_request_table("Same guest at L0, L2, L3 (output-triggered unless an interval is given): "
                                     "requests, ratios against L0 in this run", out["configs"]))
    if out["two_vcpus"]:
        console.print(_request_table("2-vCPU guest", out["two_vcpus"]))
    if out["configs"] or out["two_vcpus"]:
        console.print(_engine_table("Level 3 engine under that load (p50 ms unless noted; RAM/disk: finding and "
                                    "reading what changed; silence: the longest wait for the partner, max)",
                                    [(m["config"], m["engine"]) for m in out["configs"] + out["two_vcpus"]
                                     if m.get("engine")]))
    if out["pause_by_size"]:
        console.print(_engine_table("Pause by size, light load (one client, a write every 20 ms)",
                                    [(f"{r['memory_mib']} MiB, {r['disk_gib']:g} GiB disk, {r['engine']}", r)
                                     for r in out["pause_by_size"]]))
    if not out["failover"]:
        for error in out.get("errors", []):
            console.print(f"[red]not measured:[/] {error}", highlight=False)
        return
    t = Table(title="Level 3 failovers: power loss of the primary (warm: the partner's QEMU was started ahead; "
                    "cold: started at the takeover)", title_justify="left")
    for col in ("size", "runs", "warm: next reply median/max s", "cold: next reply median/max s",
                "takeover s (warm)", "connections kept", "records lost", "sequence breaks", "copies running at once"):
        t.add_column(col, justify="right")

    def replies(f: dict[str, Any], kind: str) -> str:
        k = f.get(kind) or {}
        if not k.get("runs"):
            return "-"
        return f"{k['reply_after_loss_median_s']:.2f}/{k['reply_after_loss_max_s']:.2f} ({k['runs']})"
    for f in out["failover"]:
        takeover = (f.get("warm") or {}).get("takeover_median_s")
        t.add_row(f"{f['memory_mib']} MiB, {f['disk_gib']:g} GiB disk", str(len(f["runs"])), replies(f, "warm"),
                  replies(f, "cold"), f"{takeover:.2f}" if takeover is not None else "-",
                  f"{f['connections_kept']}/{len(f['runs'])}", str(f["lost_total"]),
                  str(f["seq_breaks_total"]), str(f["max_copies"]))
    console.print(t)
    for error in out.get("errors", []):
        console.print(f"[red]not measured:[/] {error}", highlight=False)


def check_failed(out: dict[str, Any]) -> bool:
    return bool(out.get("errors")) or any(
        f["lost_total"] > 0 or f["connections_kept"] < len(f["runs"]) or f["seq_breaks_total"] > 0
        or f["max_copies"] > 1 for f in out["failover"])
