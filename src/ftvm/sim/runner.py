"""`ftvm sim`: many random schedules of the simulated pool (sim/world.py), their figures and
every invariant violation, with the seed that replays it (`--replay SEED`)."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .world import RECOVERY_BOUND_S, Outcome, run


@dataclass
class Figures:
    schedules: int = 0
    steps: int = 0
    writes_acked: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    recovery_s: list[float] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, o: Outcome) -> None:
        self.schedules += 1
        self.steps += o.steps
        self.writes_acked += o.writes_acked
        self.faults.update(o.faults)
        if o.recovery_s is not None:
            self.recovery_s.append(o.recovery_s)
        if not o.ok:
            self.failed.append(o)

    def to_json(self) -> dict[str, Any]:
        r = sorted(self.recovery_s)

        def pct(q: float) -> float | None:
            return round(r[min(len(r) - 1, int(q * len(r)))], 1) if r else None
        return {"schedules": self.schedules, "steps": self.steps, "writes_acked": self.writes_acked,
                "faults": dict(sorted(self.faults.items())), "seconds": round(self.seconds, 1),
                "recovery_s": {"p50": pct(0.5), "p99": pct(0.99), "max": r[-1] if r else None,
                               "bound": RECOVERY_BOUND_S},
                "violations": [{"seed": o.seed, "what": [v.what for v in o.violations[:3]]
                                or [f"not protected within {RECOVERY_BOUND_S:g} s of the last fault healed"]}
                               for o in self.failed]}


def _one(args: tuple[int, int]) -> Outcome:
    seed, steps = args
    o = run(seed, steps=steps)
    if o.ok:  # (a passing schedule's trace is not sent back)
        o.trace, o.schedule = [], []
    return o


def simulate(first: int, count: int, steps: int, jobs: int, progress=lambda f: None) -> Figures:  # type: ignore[no-untyped-def]
    figures = Figures()
    t0 = time.monotonic()
    work = [(seed, steps) for seed in range(first, first + count)]
    if jobs <= 1:
        for w in work:
            figures.add(_one(w))
            if figures.schedules % 1000 == 0:
                progress(figures)
    else:
        with ProcessPoolExecutor(jobs) as pool:
            for o in pool.map(_one, work, chunksize=50):
                figures.add(o)
                if figures.schedules % 1000 == 0:
                    progress(figures)
    figures.seconds = time.monotonic() - t0
    return figures


def render(figures: Figures) -> str:
    d = figures.to_json()
    rec = d["recovery_s"]
    lines = [f"{d['schedules']} schedules, {d['steps']} steps, {d['writes_acked']} writes acknowledged, "
             f"in {d['seconds']:g} s",
             "faults: " + ", ".join(f"{k} {v}" for k, v in d["faults"].items()),
             f"back to protected after the last fault healed: p50 {rec['p50']} s, p99 {rec['p99']} s, "
             f"max {rec['max']} s (bound {rec['bound']:g} s, simulated)",
             f"invariant violations: {len(d['violations'])}"]
    for v in d["violations"][:10]:
        lines.append(f"  seed {v['seed']}: {'; '.join(v['what'])} (`ftvm sim --replay {v['seed']}`)")
    return "\n".join(lines)


def replay(seed: int, steps: int) -> str:
    o = run(seed, steps=steps)
    out = [f"seed {seed}: {'ok' if o.ok else 'FAILED'}; {o.steps} steps; recovery "
           f"{'none' if o.recovery_s is None else f'{o.recovery_s:.1f} s'}",
           "faults:", *[f"  {line}" for line in o.schedule],
           "violations:", *[f"  step {v.step}: {v.what}" for v in o.violations],
           "what the hosts did (last 200):", *[f"  {line}" for line in o.trace[-200:]]]
    return "\n".join(out)


def cmd_sim(args: Any) -> int:
    if args.replay is not None:
        print(replay(args.replay, args.steps))
        return 0
    figures = simulate(args.first, args.schedules, args.steps, args.jobs,
                       progress=lambda f: print(f"... {f.schedules} schedules", flush=True)
                       if args.output != "json" else None)
    print(json.dumps(figures.to_json(), indent=2) if args.output == "json" else render(figures))
    return 1 if figures.failed else 0
