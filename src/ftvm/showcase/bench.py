"""`ftvm bench failover --level 1 --runs N`: repeated Level 1 failovers in one lab pool."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from ..cli.common import BAD_INPUT, FAILED, OK, CliError, console, emit_json, is_json
from ..guest.build import GuestBuildError, build_guest
from ..lab import lab as labmod
from ..lab.scenario import FailoverResult, LabPool, ScenarioError, ensure_root, level1_failover

FIGURES = ("detection_s", "restart_s", "outage_s", "lost")


def summarize(results: list[FailoverResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in FIGURES:
        values = [getattr(r, f) for r in results]
        out[f] = {"median": statistics.median(values), "max": max(values)}
    return out


def cmd_bench(args: Any) -> int:
    if args.runs < 1:
        raise CliError("--runs must be at least 1", BAD_INPUT)
    if args.what == "migration":
        return _cmd_bench_migration(args)
    if args.what == "control-plane":
        return _cmd_bench_control_plane(args)
    if args.what == "splitsite":
        return _cmd_bench_splitsite(args)
    if args.what == "dr":
        return _cmd_bench_dr(args)
    if args.level == 2:
        return _cmd_bench_level2(args)
    if args.level == 3:
        return _cmd_bench_level3(args)
    try:
        ensure_root()
        image = build_guest(log=lambda m: None)
    except (ScenarioError, GuestBuildError) as e:
        raise CliError(str(e), BAD_INPUT) from None
    lab_dir = Path(args.lab_dir) if args.lab_dir else labmod.DEFAULT_DIR
    if labmod.existing_namespaces() or (lab_dir / "lab.json").exists():
        raise CliError("a lab is already up: the benchmark builds its own; run `ftvm lab down` first",
                       BAD_INPUT)
    results: list[FailoverResult] = []
    quiet = is_json(args)
    try:
        state = labmod.up(2, lab_dir, probe_kernel=str(image.kernel))
        pool = LabPool(state)
        for i in range(args.runs):
            def progress(message: str, run: int = i + 1) -> None:
                if not quiet:
                    console.print(f"[dim]run {run}:[/] {message}", highlight=False)

            r = level1_failover(pool, image, name=f"bench{i}", index=i % 100, progress=progress)
            results.append(r)
            if not quiet:
                console.print(f"run {i + 1}: detection {r.detection_s:.2f}s  restart {r.restart_s:.2f}s  "
                              f"outage {r.outage_s:.2f}s  lost {r.lost}/{r.acknowledged}", highlight=False)
            labmod.restore_host(state, r.failed_host)
            labmod.wait_for_hosts(state, state.hosts, 30)
            pool.stop_and_remove(r.vm)
    except (ScenarioError, labmod.LabError) as e:
        raise CliError(f"benchmark failed: {e}", FAILED) from None
    finally:
        labmod.down(lab_dir)
    ttl = results[0].lease_ttl_s
    summary = summarize(results)
    if is_json(args):
        emit_json({"level": 1, "runs": [dict((k, v) for k, v in r.to_json().items() if k != "events")
                                        for r in results],
                   "lease_ttl_s": ttl, "summary": summary})
        return OK
    t = Table(title=f"Level 1 failover, {len(results)} runs (lease TTL {ttl:g} s)", title_justify="left")
    for col in ("run", "detection s", "restart s", "outage s", "lost / acked"):
        t.add_column(col, justify="right")
    for i, r in enumerate(results, 1):
        t.add_row(str(i), f"{r.detection_s:.2f}", f"{r.restart_s:.2f}", f"{r.outage_s:.2f}",
                  f"{r.lost} / {r.acknowledged}")
    for agg in ("median", "max"):
        t.add_row(agg, *(f"{summary[f][agg]:.2f}" for f in FIGURES[:3]), f"{summary['lost'][agg]}")
    console.print(t)
    return OK


# --- level 2 ---------------------------------------------------------------------------

ROUNDS = 11
RESYNC_MIB = 16  # written while the partner is away: less than the 32 MiB scratch area, so no block twice


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _mean_us(stats: dict[str, int], op: str) -> float:
    """Mean microseconds per request of `op` ("wr", "flush") from QEMU's block counters."""
    return stats.get(f"{op}_total_time_ns", 0) / max(1, stats.get(f"{op}_operations", 0)) / 1e3


def run_level2_bench(lab_dir: Path, runs: int, write_mib: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from ..core.model import Level
    from ..core.replication import CopyState
    from ..lab import topology as topo
    from ..lab.scenario import copy_is, host_failure

    image = build_guest(log=lambda m: None)
    state = labmod.up(2, lab_dir, probe_kernel=str(image.kernel))
    pool = LabPool(state)
    out: dict[str, Any] = {"level": 2, "write_mib": write_mib}
    try:
        specs = {0: pool.define_ledger_vm("plain", 60, Level.UNPROTECTED, image, host="h1"),
                 2: pool.define_ledger_vm("mirror", 61, Level.COMPONENT, image, host="h1")}
        ips = {lvl: topo.vm_addr(i).split("/")[0] for lvl, i in ((0, 60), (2, 61))}
        for lvl, spec in specs.items():
            pool.wait_running(spec.name, 60)
            pool.wait_answering(ips[lvl], 60)

        pool.wait_for("mirror in sync", copy_is("mirror", "h2", CopyState.CURRENT), 60)
        progress("level 0 and level 2 VMs on h1 (level 2 mirrored to h2); same workload on both, interleaved")
        for lvl in (0, 2):  # steady state: every block of the scratch area allocated on every copy
            pool.bulk_write(ips[lvl], 32, 1024)
        tput: dict[int, list[float]] = {0: [], 2: []}
        deep: dict[int, list[float]] = {0: [], 2: []}
        small: dict[int, list[float]] = {0: [], 2: []}
        buffered: dict[int, list[float]] = {0: [], 2: []}
        lat: dict[int, list[float]] = {0: [], 2: []}
        device: dict[int, dict[str, int]] = {0: {}, 2: {}}  # QEMU's disk counters over the 1 MiB runs
        names = {lvl: spec.name for lvl, spec in specs.items()}
        for rnd in range(ROUNDS):
            for lvl in (0, 2):
                before = pool.disk_stats(names[lvl])
                tput[lvl].append(write_mib / pool.bulk_write(ips[lvl], write_mib, 1024))
                after = pool.disk_stats(names[lvl])
                for k in after:
                    device[lvl][k] = device[lvl].get(k, 0) + after[k] - before.get(k, 0)
                deep[lvl].append(pool.parallel_bulk_write(ips[lvl], 4, write_mib // 4, 1024))
                small[lvl].append(write_mib / pool.bulk_write(ips[lvl], write_mib, 64))
                buffered[lvl].append(write_mib / pool.bulk_write(ips[lvl], write_mib, 1024, buffered=True))
                lat[lvl] += pool.latencies(ips[lvl], 200)
            progress(f"round {rnd + 1}/{ROUNDS}: 1 MiB writes L0 {tput[0][-1]:.1f} MiB/s, L2 {tput[2][-1]:.1f} "
                     f"MiB/s; 64 KiB writes L0 {small[0][-1]:.1f} MiB/s, L2 {small[2][-1]:.1f} MiB/s")
        figures = {lvl: {"throughput_mib_s": statistics.median(tput[lvl]),
                         "throughput_qd4_mib_s": statistics.median(deep[lvl]),
                         "throughput_64k_mib_s": statistics.median(small[lvl]),
                         "throughput_buffered_mib_s": statistics.median(buffered[lvl]),
                         "latency_p50_ms": 1000 * _pct(lat[lvl], 0.5),
                         "latency_p99_ms": 1000 * _pct(lat[lvl], 0.99),
                         # where a 1 MiB write's time goes: the disk as the guest sees it, per request
                         "device_write_us": _mean_us(device[lvl], "wr"),
                         "device_write_kib": device[lvl].get("wr_bytes", 0) / 1024
                         / max(1, device[lvl].get("wr_operations", 0)),
                         "device_flush_us": _mean_us(device[lvl], "flush")} for lvl in (0, 2)}
        out["level0"], out["level2"] = figures[0], figures[2]
        out["ratios"] = {k: figures[2][k] / figures[0][k] for k in figures[0]}
        # each round ran both levels back to back: the spread of its L2/L0 ratios shows how
        # much of a median ratio is the shared machine's noise
        per_round = {"throughput_mib_s": tput, "throughput_qd4_mib_s": deep, "throughput_64k_mib_s": small,
                     "throughput_buffered_mib_s": buffered}
        round_ratios = {k: [l2 / l0 for l0, l2 in zip(v[0], v[2], strict=True)] for k, v in per_round.items()}
        out["ratio_range"] = {k: [min(r), max(r)] for k, r in round_ratios.items()}
        pool.stop_and_remove("plain")

        progress("resync: partner h2 loses power, the guest writes, h2 returns")
        labmod.fail_host(state, "h2")
        pool.wait_for("replica outdated", copy_is("mirror", "h2", CopyState.OUTDATED), 30)
        pool.bulk_write(ips[2], RESYNC_MIB)
        t_back = time.time()
        labmod.restore_host(state, "h2")
        pool.wait_for("replica in sync", copy_is("mirror", "h2", CopyState.CURRENT), 120)
        done = pool.wait_events("resync done", lambda e: e.vm == "mirror" and e.kind == "in-sync"
                                and e.time > t_back)[-1]
        copied = int(done.message.split("resync copied ")[1].split()[0])
        written = int(done.message.split("(")[1].split()[0])
        out["resync"] = {"bytes_copied": copied, "bytes_written_apart": written,
                         "efficiency": copied / written if written else None}

        progress(f"failover: {runs} power losses of the primary, back and forth")
        results: list[FailoverResult] = []
        for i in range(runs):
            r = host_failure(pool, specs[2])
            results.append(r)
            progress(f"failover {i + 1}: outage {r.outage_s:.2f}s, lost {r.lost}/{r.acknowledged}")
            labmod.restore_host(state, r.failed_host)
            pool.wait_for("old primary resynced", copy_is("mirror", r.failed_host, CopyState.CURRENT), 120)
        outages = [r.outage_s for r in results]
        out["failover"] = {"runs": [{"outage_s": r.outage_s, "detection_s": r.detection_s, "restart_s": r.restart_s,
                                     "lost": r.lost, "acknowledged": r.acknowledged} for r in results],
                           "outage_median_s": statistics.median(outages), "outage_max_s": max(outages),
                           "lost_total": sum(r.lost for r in results)}
    finally:
        labmod.down(lab_dir)
    return out


def print_level2(out: dict[str, Any]) -> None:
    t = Table(title=f"Level 0 vs Level 2 on the same hosts, interleaved: {ROUNDS} rounds of {out['write_mib']} MiB "
                    "bulk writes each way and 200 ledger writes (medians; latency over all)", title_justify="left")
    for col in ("figure", "level 0", "level 2", "L2 / L0", "rounds' L2 / L0"):
        t.add_column(col, justify="right")
    for k, label in (("throughput_mib_s", "write throughput MiB/s (1 MiB O_DSYNC writes, one writer)"),
                     ("throughput_qd4_mib_s", "write throughput MiB/s (1 MiB O_DSYNC writes, 4 writers)"),
                     ("throughput_64k_mib_s", "write throughput MiB/s (64 KiB O_DSYNC writes, one writer)"),
                     ("throughput_buffered_mib_s", "write throughput MiB/s (page cache, one fdatasync at the end)"),
                     ("latency_p50_ms", "ledger write+reply latency p50 ms"),
                     ("latency_p99_ms", "ledger write+reply latency p99 ms"),
                     ("device_write_us", "1 MiB runs: disk write request, submission to completion, us"),
                     ("device_write_kib", "1 MiB runs: disk write request size, KiB (mean)"),
                     ("device_flush_us", "1 MiB runs: disk flush request, us")):
        lo_hi = out["ratio_range"].get(k)
        t.add_row(label, f"{out['level0'][k]:.2f}", f"{out['level2'][k]:.2f}", f"{out['ratios'][k]:.2f}",
                  f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}" if lo_hi else "")
    console.print(t)
    r = out["resync"]
    console.print(f"resync after the partner was away: copied {r['bytes_copied'] / 2**20:.1f} MiB for "
                  f"{r['bytes_written_apart'] / 2**20:.1f} MiB written while apart "
                  f"(efficiency {r['efficiency']:.2f}, goal <= 1.10)", highlight=False)
    f = out["failover"]
    console.print(f"level 2 failover outage over {len(f['runs'])} runs: median {f['outage_median_s']:.2f} s, "
                  f"max {f['outage_max_s']:.2f} s; acknowledged records lost: {f['lost_total']}", highlight=False)


def _lab_bench(args: Any, run: Callable[[Path, Callable[[str], None]], dict[str, Any]],
               show: Callable[[dict[str, Any]], None], failed: Callable[[dict[str, Any]], bool] = lambda out: False,
               json_extra: dict[str, Any] | None = None) -> int:
    """The frame every lab benchmark shares: root, a lab of its own, progress lines unless
    JSON was asked, the figures printed or emitted, exit code FAILED when `failed(out)`."""
    try:
        ensure_root()
    except ScenarioError as e:
        raise CliError(str(e), BAD_INPUT) from None
    lab_dir = Path(args.lab_dir) if args.lab_dir else labmod.DEFAULT_DIR
    if labmod.existing_namespaces() or (lab_dir / "lab.json").exists():
        raise CliError("a lab is already up: the benchmark builds its own; run `ftvm lab down` first", BAD_INPUT)
    quiet = is_json(args)

    def progress(message: str) -> None:
        if not quiet:
            console.print(f"[dim]{message}[/]", highlight=False)

    try:
        out = run(lab_dir, progress)
    except (ScenarioError, labmod.LabError, GuestBuildError, OSError) as e:
        raise CliError(f"benchmark failed: {e}", FAILED) from None
    if quiet:
        emit_json((json_extra or {}) | out)
    else:
        show(out)
    return FAILED if failed(out) else OK


def _cmd_bench_level2(args: Any) -> int:
    return _lab_bench(args, lambda lab_dir, progress: run_level2_bench(lab_dir, args.runs, args.write_mib, progress),
                      print_level2)


def _cmd_bench_level3(args: Any) -> int:
    from .bench_l3 import PARTS, check_failed, print_level3, run_level3_bench
    parts = tuple(args.part) if args.part else PARTS
    return _lab_bench(args, lambda lab_dir, progress: run_level3_bench(lab_dir, args.runs, progress, parts=parts),
                      print_level3, check_failed, json_extra={"level": 3})


def _cmd_bench_migration(args: Any) -> int:
    from .bench_ops import migration_failed, print_migration, run_migration_bench
    return _lab_bench(args, lambda lab_dir, progress: run_migration_bench(lab_dir, args.runs, progress),
                      print_migration, migration_failed)


def _cmd_bench_control_plane(args: Any) -> int:
    from .bench_ops import print_control_plane, run_control_plane_bench
    return _lab_bench(args, lambda lab_dir, progress: run_control_plane_bench(lab_dir, (0, 10, 50), 10.0, progress),
                      print_control_plane)


def _cmd_bench_splitsite(args: Any) -> int:
    from .bench_splitsite import print_splitsite, run_splitsite_bench, splitsite_failed
    return _lab_bench(args, run_splitsite_bench, print_splitsite, splitsite_failed, json_extra={"bench": "splitsite"})


def _cmd_bench_dr(args: Any) -> int:
    from .bench_dr import print_dr, run_dr_bench
    return _lab_bench(args, run_dr_bench, print_dr, json_extra={"bench": "dr"})
