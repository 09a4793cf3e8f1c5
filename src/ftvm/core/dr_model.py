"""The RPO/bandwidth modeler of asynchronous disaster recovery (pure).

Asynchronous DR ships a VM's writes to a remote pool as recovery points: every
`point_interval_s` the owner closes a point (a crash-consistent cut across the VM's disks)
and sends what the guest wrote since the previous one, compressed. A point is usable at
the DR site once its last byte has arrived and it is committed there (half a round trip
after the last byte). One point at a time, as the agent ships them: the next is cut an
interval after this one, or when this one's commit is answered if that is later. A burst
the link cannot carry at once makes the points that carry it late and bigger (lag), and
the link catches up when the writes slow down.

    lag(t)  = t - (the instant the newest point usable at the DR site at t was taken)
    RPO(t)  = lag(t): what a failover to the DR site at t would lose, in seconds of writes

From a write-rate trace (bytes the guest wrote per second), how well its writes compress
and the link's rate and round trip, `simulate` gives the lag over time, its percentiles and
the catch-up time after each burst; `bandwidth_for` the least rate that keeps p99 lag
within a target. It overestimates what a point carries where the guest rewrites the same
blocks within one interval (the agent sends each dirty block once): `unique` scales the
written bytes down to what the dirty bitmaps would hold, if it was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STEP_S = 0.1  # resolution of the simulated lag series


class ModelError(ValueError):
    pass


@dataclass(frozen=True)
class Trace:
    """Bytes the guest wrote in each `interval_s` (QEMU's block counters, sampled)."""

    interval_s: float
    written: tuple[int, ...]

    @property
    def seconds(self) -> float:
        return self.interval_s * len(self.written)


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    rtt_s: float = 0.0


@dataclass(frozen=True)
class Shipping:
    point_interval_s: float = 10.0  # how often a recovery point is closed
    compression: float = 1.0        # bytes sent per byte written (0.3: writes compress 3.3:1)
    unique: float = 1.0             # share of written bytes that are distinct blocks within a point


@dataclass
class Prediction:
    lag: list[tuple[float, float]] = field(default_factory=list)  # (t, lag seconds), every STEP_S
    p50_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0
    catch_ups: list[tuple[float, float]] = field(default_factory=list)  # (burst start, seconds to catch up)
    bytes_written: int = 0
    bytes_sent: int = 0
    link_busy: float = 0.0  # share of the time the link carried DR traffic

    def to_json(self) -> dict[str, object]:
        return {"p50_s": self.p50_s, "p99_s": self.p99_s, "max_s": self.max_s,
                "catch_ups": [{"at_s": round(a, 1), "seconds": round(b, 1)} for a, b in self.catch_ups],
                "bytes_written": self.bytes_written, "bytes_sent": self.bytes_sent,
                "link_busy": round(self.link_busy, 3)}


def check(trace: Trace, link: Link, ship: Shipping) -> None:
    if not trace.written or trace.interval_s <= 0:
        raise ModelError("the trace is empty")
    if any(b < 0 for b in trace.written):
        raise ModelError("the trace has a negative byte count")
    if not (link.bytes_per_s > 0 and math.isfinite(link.bytes_per_s)):
        raise ModelError("the link's rate must be a positive number")
    if not 0 <= link.rtt_s <= 10:
        raise ModelError("the round trip must be 0 to 10 s")
    if not 0.1 <= ship.point_interval_s <= 3600:
        raise ModelError("a recovery point every 0.1 s to 1 h")
    if not 0 < ship.compression <= 2 or not 0 < ship.unique <= 1:
        raise ModelError("compression (bytes sent per byte written) must be in (0, 2], unique in (0, 1]")


def simulate(trace: Trace, link: Link, ship: Shipping) -> Prediction:
    check(trace, link, ship)
    # As the owner's agent ships (agent/dr.py): one point at a time. A point is cut every
    # interval, or when the one before is acknowledged if that took longer (then it carries
    # everything written meanwhile: the link's backlog becomes bigger points, not a queue).
    usable: list[tuple[float, float]] = []  # (usable at the DR site, taken at)
    cut, previous, busy, total_written, sent = min(ship.point_interval_s, trace.seconds), 0.0, 0.0, 0.0, 0.0
    while True:
        written = _written_between(trace, previous, cut)
        total_written += written
        size = written * ship.unique * ship.compression
        sent += size
        transfer = size / link.bytes_per_s
        busy += transfer
        usable.append((cut + transfer + link.rtt_s / 2, cut))
        if cut >= trace.seconds - 1e-9:
            break
        acked = cut + transfer + link.rtt_s
        previous, cut = cut, min(max(cut + ship.point_interval_s, acked), trace.seconds)
    pred = Prediction(bytes_written=round(total_written), bytes_sent=round(sent),
                      link_busy=min(1.0, busy / max(trace.seconds, 1e-9)))
    i, newest_taken = 0, 0.0  # before the first point: the state at t=0 (the initial copy) is there
    steps = int(trace.seconds / STEP_S)
    for n in range(steps + 1):
        now = n * STEP_S
        while i < len(usable) and usable[i][0] <= now:
            newest_taken = usable[i][1]
            i += 1
        pred.lag.append((round(now, 3), round(now - newest_taken, 3)))
    lags = sorted(lag for _, lag in pred.lag)
    pred.p50_s, pred.p99_s, pred.max_s = _pct(lags, 0.5), _pct(lags, 0.99), lags[-1]
    pred.catch_ups = _catch_ups(usable, ship.point_interval_s + link.rtt_s / 2)
    return pred


def bandwidth_for(trace: Trace, rtt_s: float, ship: Shipping, rpo_p99_s: float) -> float:
    """The least link rate (bytes/s) whose predicted p99 lag is within `rpo_p99_s`. A point
    cannot be younger than its interval plus the round trip: a target below that is refused."""
    floor = ship.point_interval_s + rtt_s / 2
    if rpo_p99_s < floor:
        raise ModelError(f"an RPO of {rpo_p99_s:g} s cannot be met with a recovery point every "
                         f"{ship.point_interval_s:g} s and a {rtt_s * 1000:g} ms round trip (at least {floor:g} s)")
    hi = max(1.0, max(trace.written) / trace.interval_s * ship.compression * ship.unique * 4)
    while simulate(trace, Link(hi, rtt_s), ship).p99_s > rpo_p99_s:
        hi *= 2
        if hi > 1e12:
            raise ModelError("no link rate meets that RPO")
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid > 0 and simulate(trace, Link(mid, rtt_s), ship).p99_s <= rpo_p99_s:
            hi = mid
        else:
            lo = mid
    return hi


def _written_between(trace: Trace, a: float, b: float) -> float:
    """Bytes written in [a, b), spreading each sample evenly over its interval."""
    total, i = 0.0, int(a / trace.interval_s)
    while i < len(trace.written) and i * trace.interval_s < b:
        lo, hi = max(a, i * trace.interval_s), min(b, (i + 1) * trace.interval_s)
        if hi > lo:
            total += trace.written[i] * (hi - lo) / trace.interval_s
        i += 1
    return total


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _catch_ups(usable: list[tuple[float, float]], limit_s: float) -> list[tuple[float, float]]:
    """Each burst the link could not carry at once: a run of points that each took longer than
    `limit_s` (an interval and half a round trip) from being closed to being usable. When the
    first of them was closed, and how long until a point was again usable within the limit."""
    out, since = [], None
    for usable_at, closed in usable:
        late = usable_at - closed > limit_s + 1e-6
        if late and since is None:
            since = closed
        elif not late and since is not None:
            out.append((since, usable_at - since))
            since = None
    if since is not None:
        out.append((since, float("inf")))
    return out


def parse_trace(text: str) -> Trace:
    """A trace file: one sample per line, `seconds,bytes` (seconds since the start, evenly
    spaced) or just `bytes`; `#` comments. At most a week of 1 s samples."""
    rows: list[tuple[float | None, int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) == 1:
                rows.append((None, int(float(parts[0]))))
            elif len(parts) == 2:
                rows.append((float(parts[0]), int(float(parts[1]))))
            else:
                raise ValueError
        except ValueError:
            raise ModelError(f"trace line {n}: expected `seconds,bytes` or `bytes`, got {line[:60]!r}") from None
        if len(rows) > 7 * 86400:
            raise ModelError("a trace of more than a week of samples")
    if not rows:
        raise ModelError("the trace is empty")
    times = [t for t, _ in rows if t is not None]
    interval = 1.0
    if times:
        if len(times) != len(rows):
            raise ModelError("either every trace line has its time or none has")
        steps = [b - a for a, b in zip(times, times[1:], strict=False)]
        interval = steps[0] if steps else 1.0
        if interval <= 0 or any(abs(s - interval) > interval * 0.01 for s in steps):
            raise ModelError("trace samples must be evenly spaced")
    return Trace(interval, tuple(b for _, b in rows))


def svg(pred: Prediction, title: str, rpo_s: float | None = None, measured: list[tuple[float, float]] | None = None,
        width: int = 800, height: int = 300) -> str:
    """The predicted lag over time (and the measured one, if given) as an SVG a browser shows."""
    series = [("predicted", "#1f77b4", pred.lag)] + ([("measured", "#d62728", measured)] if measured else [])
    t_max = max((t for _, _, s in series for t, _ in s), default=1.0) or 1.0
    y_max = max([v for _, _, s in series for _, v in s] + [rpo_s or 0.0, 1.0]) * 1.1
    left, bottom, top = 50, 30, 30

    def x(t: float) -> float:
        return left + (width - left - 10) * t / t_max

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - v / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<text x="{left}" y="18" font-size="13">{_esc(title)}</text>',
           f'<line x1="{left}" y1="{y(0)}" x2="{width - 10}" y2="{y(0)}" stroke="#999"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y(0)}" stroke="#999"/>',
           f'<text x="{left - 5}" y="{y(y_max / 1.1):.0f}" text-anchor="end">{y_max / 1.1:.0f} s</text>',
           f'<text x="{width - 10}" y="{height - 8}" text-anchor="end">{t_max:.0f} s</text>']
    if rpo_s is not None:
        out.append(f'<line x1="{left}" y1="{y(rpo_s):.1f}" x2="{width - 10}" y2="{y(rpo_s):.1f}" stroke="#2ca02c" '
                   f'stroke-dasharray="4 3"/><text x="{width - 12}" y="{y(rpo_s) - 3:.1f}" text-anchor="end" '
                   f'fill="#2ca02c">RPO target {rpo_s:g} s</text>')
    for i, (name, color, s) in enumerate(series):
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s[:: max(1, len(s) // 2000)])
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        out.append(f'<text x="{left + 10 + 110 * i}" y="{top - 3}" fill="{color}">{name} lag</text>')
    out.append("</svg>")
    return "\n".join(out)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
