"""`ftvm bench failover --level 1 --runs N`: repeated Level 1 failovers in one lab pool."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

from .cli.common import BAD_INPUT, FAILED, OK, CliError, console, emit_json, is_json
from .guest.build import GuestBuildError, build_guest
from .lab import lab as labmod
from .lab.scenario import FailoverResult, LabPool, ScenarioError, ensure_root, level1_failover

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
