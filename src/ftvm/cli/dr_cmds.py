"""`ftvm dr ...`: asynchronous disaster recovery: DR targets, protecting a VM, the RPO/bandwidth
modeler (core/dr_model.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ..core.dr_model import Link, ModelError, Shipping, bandwidth_for, parse_trace, simulate, svg
from .client import pool_client
from .common import BAD_INPUT, NOT_FOUND, OK, CliError, console, emit_json, is_json
from .lab_cmds import parse_rate_mbit, parse_rtt_ms
from .pool_cmds import parse_duration

MAX_TRACE_BYTES = 64 << 20


def cmd_dr_model(args: Any) -> int:
    """Predict the lag (RPO) a link gives a VM's writes, or the link an RPO needs."""
    if bool(args.vm) == bool(args.trace):
        raise CliError("give a VM (its recorded write-rate trace) or --trace FILE (one line per second: "
                       "`seconds,bytes` or `bytes`)", BAD_INPUT)
    measured_compression = None
    if args.vm:
        client = pool_client(args)
        text = client.write_trace(args.vm, int(parse_duration(args.last, "--last")))
        dr = (client.vm(args.vm).get("dr") or {})
        if dr.get("written_bytes"):  # (what its DR points compressed to, if it ships them)
            measured_compression = dr["sent_bytes"] / dr["written_bytes"]
        where = f"VM {args.vm}'s recorded trace"
    else:
        path = Path(args.trace)
        where = f"trace {path}"
        try:
            if path.stat().st_size > MAX_TRACE_BYTES:
                raise CliError(f"trace {path}: larger than {MAX_TRACE_BYTES >> 20} MiB", BAD_INPUT)
            text = path.read_text()
        except OSError as e:
            raise CliError(f"trace {path}: {e.strerror or e}", BAD_INPUT) from None
        except UnicodeDecodeError as e:
            raise CliError(f"trace {path}: {e}", BAD_INPUT) from None
    try:
        trace = parse_trace(text)
    except ModelError as e:
        raise CliError(f"{where}: {e}", BAD_INPUT) from None
    compression = (args.compression if args.compression is not None
                   else round(min(1.0, measured_compression), 3) if measured_compression else 1.0)
    rtt_s = parse_rtt_ms(args.rtt) / 1000
    ship = Shipping(point_interval_s=parse_duration(args.interval, "--interval"), compression=compression,
                    unique=args.unique)
    rpo = parse_duration(args.rpo, "--rpo") if args.rpo else None
    if args.bandwidth is None and rpo is None:
        raise CliError("give --bandwidth (predict the lag) or --rpo (the bandwidth it needs), or both", BAD_INPUT)
    try:
        need = bandwidth_for(trace, rtt_s, ship, rpo) if rpo is not None else None
        rate = parse_rate_mbit(args.bandwidth) * 1e6 / 8 if args.bandwidth else need
        assert rate is not None
        pred = simulate(trace, Link(rate, rtt_s), ship)
    except ModelError as e:
        raise CliError(str(e), BAD_INPUT) from None
    title = (f"predicted DR lag: {rate * 8 / 1e6:.1f} Mbit/s, RTT {rtt_s * 1000:g} ms, a point every "
             f"{ship.point_interval_s:g} s")
    if args.svg:
        Path(args.svg).write_text(svg(pred, title, rpo))
    out = {"trace_seconds": trace.seconds, "bandwidth_mbit": round(rate * 8 / 1e6, 2), "rtt_ms": rtt_s * 1000,
           "point_interval_s": ship.point_interval_s, "compression": ship.compression, "unique": ship.unique,
           "lag": pred.to_json()}
    if need is not None:
        out["rpo_p99_s"] = rpo
        out["bandwidth_needed_mbit"] = round(need * 8 / 1e6, 2)
    if is_json(args):
        emit_json(out)
        return OK
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_row("trace", f"{trace.seconds:g} s, {pred.bytes_written / 2**20:.1f} MiB written, "
                       f"{pred.bytes_sent / 2**20:.1f} MiB to send")
    t.add_row("lag (RPO) p50 / p99 / max", f"{pred.p50_s:.1f} / {pred.p99_s:.1f} / {pred.max_s:.1f} s")
    t.add_row("link busy with DR", f"{100 * pred.link_busy:.0f}%")
    for at, took in pred.catch_ups:
        t.add_row("burst at", f"{at:.0f} s: caught up after " + (f"{took:.0f} s" if took != float("inf")
                                                                  else "not by the trace's end"))
    if need is not None:
        t.add_row(f"bandwidth for p99 lag <= {rpo:g} s", f"{need * 8 / 1e6:.1f} Mbit/s")
    if args.svg:
        t.add_row("plot", str(args.svg))
    console.print(t)
    return OK


def cmd_dr_add(args: Any) -> int:
    rpo = parse_duration(args.rpo, "--rpo")
    spec = pool_client(args).patch(args.name, {"dr_target": args.to, "dr_rpo_s": rpo})
    if is_json(args):
        emit_json({"vm": args.name, "dr_target": spec["dr_target"], "dr_rpo_s": spec["dr_rpo_s"]})
    else:
        console.print(f"VM {args.name}: recovery points to {args.to}, RPO {rpo:g} s (its owner starts shipping them)")
    return OK


def cmd_dr_remove(args: Any) -> int:
    pool_client(args).patch(args.name, {"dr_target": "", "dr_rpo_s": 0})
    if is_json(args):
        emit_json({"vm": args.name, "dr_target": ""})
    else:
        console.print(f"VM {args.name}: DR replication stopped (the DR site keeps the points it has)")
    return OK


def cmd_dr_target_add(args: Any) -> int:
    pool_client(args).set_dr_target(args.name, list(args.receiver))
    if is_json(args):
        emit_json({"name": args.name, "receivers": list(args.receiver)})
    else:
        console.print(f"DR target {args.name}: receivers {', '.join(args.receiver)}")
    return OK


def cmd_dr_target_remove(args: Any) -> int:
    pool_client(args).remove_dr_target(args.name)
    if is_json(args):
        emit_json({"removed": args.name})
    else:
        console.print(f"DR target {args.name} removed")
    return OK


def cmd_dr_target_list(args: Any) -> int:
    targets = pool_client(args).dr_targets()
    if is_json(args):
        emit_json({"targets": targets})
        return OK
    t = Table(title="DR targets", title_justify="left")
    t.add_column("name")
    t.add_column("receivers")
    for target in targets:
        t.add_row(target["name"], ", ".join(target["receivers"]))
    console.print(t)
    return OK


def _replica(args: Any) -> dict[str, Any]:
    found = [r for r in pool_client(args).dr_replicas()
             if r["vm"] == args.name and (args.source is None or r["pool"] == args.source)]
    if not found:
        raise CliError(f"this pool keeps no recovery points of VM {args.name}"
                       + (f" of pool {args.source}" if args.source else "") + " (ask the DR pool: --pool/--etcd)",
                       NOT_FOUND)
    if len(found) > 1:
        raise CliError(f"VMs named {args.name} of several pools ({', '.join(r['pool'] for r in found)}): "
                       "give --from POOL", BAD_INPUT)
    return dict(found[0])


def cmd_dr_points(args: Any) -> int:
    """The points a host of this pool (the DR site) keeps of a VM, oldest first."""
    import time as _time
    r = _replica(args)
    if is_json(args):
        emit_json(r)
        return OK
    now = _time.time()
    t = Table(title=f"recovery points of {r['pool']}/{r['vm']} kept on {r['host']} "
                    f"({len(r['sizes'])} disks, {sum(r['sizes']) / 2**30:.1f} GiB)", title_justify="left")
    for col in ("point", "taken (UTC)", "age", "changed", "tested"):
        t.add_column(col, justify="right")
    for p in r["points"]:
        t.add_row(str(p["number"]), _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(p["taken_at"])),
                  f"{now - p['taken_at']:.0f} s", f"{p.get('data_bytes', 0) / 2**20:.1f} MiB",
                  "yes" if p["tested"] else "")
    console.print(t)
    heard = (r.get("contact") or {}).get("heard_at") or 0
    if heard:
        console.print(f"its site last heard {now - heard:.0f} s ago", highlight=False)
    if r.get("failed_over"):
        console.print(f"[bold]failed over[/]: {r['vm']} runs in this pool; no more points are taken")
    return OK


def cmd_dr_test(args: Any) -> int:
    r = _replica(args)
    test = pool_client(args).dr_test(r["pool"], args.name, args.point)
    if is_json(args):
        emit_json(test)
    else:
        console.print(f"test failover of {r['pool']}/{args.name} from point {test['point']}: {test['host']} starts "
                      f"{test['test_vm']} on an isolated network (replication goes on; `ftvm dr test-end "
                      f"{args.name}` removes it)")
    return OK


def cmd_dr_test_end(args: Any) -> int:
    r = _replica(args)
    pool_client(args).dr_test_end(r["pool"], args.name)
    if is_json(args):
        emit_json({"ended": args.name})
    else:
        console.print(f"test failover of {r['pool']}/{args.name} ended: its copy is powered off and removed")
    return OK


def cmd_dr_failover(args: Any) -> int:
    r = _replica(args)
    f = pool_client(args).dr_failover(r["pool"], args.name, args.point, args.accept_data_loss, args.level)
    if is_json(args):
        emit_json(f)
    else:
        then = f", then raises it to level {f['level']} online" if f["level"] else ""
        console.print(f"failover of {r['pool']}/{args.name} to point {f['point']}: {f['host']} starts it at level 0"
                      f"{then}; "
                      f"it {f['loss']}. Its old site never runs it again without `ftvm dr failback`")
    return OK


def cmd_dr_failback(args: Any) -> int:
    from .pool_cmds import parse_duration
    r = _replica(args)
    if not args.switch and not args.to:
        raise CliError("give --to TARGET (the home pool's receivers, `ftvm dr target add`) to send the VM's writes "
                       "back, then --switch once they caught up", BAD_INPUT)
    f = pool_client(args).dr_failback(r["pool"], args.name, args.to or "", parse_duration(args.rpo, "--rpo"),
                                      args.switch)
    if is_json(args):
        emit_json(f)
    elif args.switch:
        console.print(f"switchover of {args.name}: its owner here pauses it, ships its last point to "
                      f"{f['failback_target']} and stops it; {r['pool']} starts it from that point")
    else:
        console.print(f"{args.name}'s writes now go back to {args.to} (the first point is a diff against its old "
                      f"copy there); `ftvm dr failback {args.name} --switch` once `vm show` says its lag is within "
                      "the RPO")
    return OK
