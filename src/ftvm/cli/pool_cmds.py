"""`ftvm status`, `ftvm host ...`, `ftvm vm ...`, `ftvm events`: the operator's view of a pool."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from ..core.model import BootSpec, Desired, DiskSpec, Level, NicSpec, RunState, VmSpec
from .. import ops
from ..core.validate import check_mac
from ..store.pool import Event
from .client import PoolClient, pool_client
from .common import BAD_INPUT, FAILED, NO_QUORUM, NOT_FOUND, OK, REFUSED, CliError, console, emit_json, is_json


# --- pool init -----------------------------------------------------------------------

def cmd_pool_init(args: Any) -> int:
    from ..core.model import valid_name
    from ..pki import PkiError, init_pool
    hosts: dict[str, str] = {}
    for item in args.hosts:
        name, _, addr = item.partition("=")
        if not valid_name(name) or not addr:
            raise CliError(f"--host {item!r}: give NAME=ADDRESS, NAME lowercase letters, digits and '-'", BAD_INPUT)
        hosts[name] = addr
    pool = getattr(args, "pool", None) or "prod"
    if not valid_name(pool):
        raise CliError(f"invalid pool name {pool!r}", BAD_INPUT)
    if not args.etcd_addr or not hosts:
        raise CliError("give the quorum service's addresses (--etcd-addr ADDR) and every host (--host NAME=ADDR)",
                       BAD_INPUT)
    d = Path(args.dir)
    try:
        init_pool(d, pool, args.etcd_addr, hosts)
    except PkiError as e:
        raise CliError(str(e), REFUSED) from None
    if is_json(args):
        emit_json({"dir": str(d), "pool": pool, "hosts": sorted(hosts)})
    else:
        console.print(f"pool {pool}: CA, certificates for etcd and {', '.join(sorted(hosts))}, pool secret and "
                      f"API tokens in {d}. Copy them as docs/security.md says; keep {d / 'ca.key'} offline.")
    return OK


# --- status --------------------------------------------------------------------------

def cmd_status(args: Any) -> int:
    client = pool_client(args)
    try:
        data = client.status()
    except CliError as e:
        if is_json(args) and e.code == NO_QUORUM:
            emit_json({"quorum": {"reachable": False, "error": str(e)}, "via": client.where})
        raise
    if is_json(args):
        emit_json(data)
        return OK
    q = data["quorum"]
    up = sum(1 for h in data["hosts"] if h["state"] != "down")
    console.print(f"[bold]Pool[/] {data['pool']}   [bold]Quorum[/] [green]reachable[/] ({', '.join(q['endpoints'])}, "
                  f"revision {q['revision']})   [bold]Hosts up[/] {up}   [dim]via {client.where}[/]", highlight=False)
    console.print(hosts_table(data["hosts"]))
    console.print(vms_table(data["vms"]))
    return OK


def hosts_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    t = Table(title="Hosts", title_justify="left")
    with_sites = any(h.get("site") for h in rows)
    for col in ("Host", "State") + (("Site",) if with_sites else ()) + ("Memory", "vCPUs", "VMs"):
        t.add_column(col)
    colours = {"up": "green", "maintenance": "yellow", "down": "red"}
    for h in rows:
        site = (h.get("site") or "-",) if with_sites else ()
        if h["state"] == "down":
            t.add_row(h["name"], "[red]down[/]", *site, "-", "-",
                      "copies of " + (", ".join(h["copies_of"]) or "-"))
            continue
        t.add_row(h["name"], f"[{colours[h['state']]}]{h['state']}[/]", *site,
                  f"{h['memory_used_mib']}/{h['memory_mib']} MiB", f"{h['vcpus_used']}/{h['vcpus']}",
                  ", ".join(h["vms"]) or "-")
    return t


def vms_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    t = Table(title="VMs", title_justify="left")
    for col in ("VM", "Level", "Host", "Partner", "State", "Replica", "Protection", "Detail"):
        t.add_column(col)
    for v in rows:
        colour = "green" if v["protected"] and not v.get("site_caveat") else "yellow"
        level = f"L{v['level']}" if v["level"] is not None else "?"
        t.add_row(v["name"], level, v["host"] or "-", v["partner"] or "-", v["state"],
                  v["replica"] or "-", f"[{colour}]{v['protection']}[/]", v["detail"])
    return t


def cmd_host_list(args: Any) -> int:
    rows = pool_client(args).hosts()
    if is_json(args):
        emit_json(rows)
    else:
        console.print(hosts_table(rows))
    return OK


# --- vm ------------------------------------------------------------------------------

def default_mac(name: str) -> str:
    h = hashlib.sha1(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise CliError(f"bad size {text!r}: use e.g. 64M or 2G", BAD_INPUT) from None


def parse_duration(text: str, what: str) -> float:
    """Seconds from "90", "90s", "5m", "1h", "2d"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise CliError(f"{what} {text!r}: use e.g. 30s, 5m, 1h", BAD_INPUT) from None


def guest_monitoring(args: Any) -> dict[str, Any]:
    """The health probe and restart limit options given, as spec fields."""
    out: dict[str, Any] = {}
    if getattr(args, "health", None) is not None:
        out["health"] = "" if args.health == "off" else args.health
    for opt, key in (("health_interval", "health_interval_s"), ("health_timeout", "health_timeout_s"),
                     ("health_grace", "health_grace_s"), ("guest_window", "guest_window_s")):
        if getattr(args, opt, None) is not None:
            out[key] = parse_duration(getattr(args, opt), "--" + opt.replace("_", "-"))
    for opt in ("health_failures", "guest_restarts"):
        if getattr(args, opt, None) is not None:
            out[opt] = getattr(args, opt)
    return out


def cmd_vm_set(args: Any) -> int:
    """Change a VM's protection level (a running VM online), or a level 3 VM's checkpointing."""
    monitoring = guest_monitoring(args)
    if monitoring:
        if any(x is not None for x in (args.level, args.checkpoint_ms, args.checkpoint_on_output, args.sla,
                                       args.failback, args.site)):
            raise CliError("change the health probe and restart limit in a command of their own", BAD_INPUT)
        new = VmSpec.from_json(pool_client(args).patch(args.name, monitoring))
        if is_json(args):
            emit_json({"vm": args.name} | {k: getattr(new, k) for k in ops.GUEST_MONITORING})
        else:
            console.print(f"VM {args.name}: {describe_monitoring(new)}")
        return OK
    if args.site is not None:
        if any(x is not None for x in (args.level, args.checkpoint_ms, args.checkpoint_on_output, args.sla,
                                       args.failback)):
            raise CliError("change the preferred site in a command of its own", BAD_INPUT)
        site = "" if args.site == "none" else args.site
        new_spec = pool_client(args).patch(args.name, {"site": site})
        if is_json(args):
            emit_json({"vm": args.name, "site": new_spec["site"]})
        else:
            console.print(f"VM {args.name}: preferred site " + (new_spec["site"] or "none"))
        return OK
    if args.failback is not None:
        if any(x is not None for x in (args.level, args.checkpoint_ms, args.checkpoint_on_output, args.sla)):
            raise CliError("change the failback policy in a command of its own", BAD_INPUT)
        new_spec = pool_client(args).patch(args.name, {"failback": args.failback == "on"})
        if is_json(args):
            emit_json({"vm": args.name, "failback": new_spec["failback"]})
        else:
            console.print(f"VM {args.name}: failback to {new_spec['preferred_host']} "
                          + ("on" if new_spec["failback"] else "off"))
        return OK
    if args.sla is not None:
        if args.level is not None or args.checkpoint_ms is not None or args.checkpoint_on_output is not None:
            raise CliError("change the SLA target in a command of its own", BAD_INPUT)
        new_spec = pool_client(args).patch(args.name, {"sla_percent": args.sla or None})
        sla = new_spec["sla_percent"]
        if is_json(args):
            emit_json({"vm": args.name, "sla_percent": sla})
        else:
            console.print(f"VM {args.name}: SLA target " + (f"{sla:g}%" if sla else "none"))
        return OK
    if args.level is None and args.checkpoint_ms is None and args.checkpoint_on_output is None:
        raise CliError("nothing to change: give --level, --checkpoint-ms, --checkpoint-on-output, --sla, "
                       "--failback, --site, --health... or --guest-restarts/--guest-window",
                       BAD_INPUT)
    if args.level is None:
        return _set_checkpointing(args)
    if args.checkpoint_ms is not None or args.checkpoint_on_output is not None:
        raise CliError("change the level and the checkpointing in two commands", BAD_INPUT)

    client = pool_client(args)
    paths = tuple(os.path.realpath(p) for p in args.disk_path or ())
    old, online = client.change_level(args.name, args.level, paths, args.overwrite)
    new = args.level
    if not online:
        if is_json(args):
            emit_json({"vm": args.name, "level": new, "previous_level": old})
        else:
            console.print(f"VM {args.name}: level {old} -> {new}" + (" (unchanged)" if old == new else ""))
        return OK
    if not is_json(args):
        console.print(f"VM {args.name}: level {old} -> {new} asked while it runs (no restart)")
    if not args.wait:
        if is_json(args):
            emit_json({"vm": args.name, "level": new, "previous_level": old, "under_way": True})
        return OK
    done, why = _follow_level(client, args.name, old, new, args.timeout, not is_json(args))
    if is_json(args):
        emit_json({"vm": args.name, "level": new if done else old, "previous_level": old, "done": done,
                   "detail": why})
    elif not done:
        console.print(f"[red]VM {args.name}: the level change did not complete[/]: {why}", highlight=False)
    return OK if done else FAILED


def _follow_level(client: PoolClient, name: str, old: int, new: int, timeout: float,
                  show: bool) -> tuple[bool, str]:
    """Until the running VM is at the new level (raising: and protected again), with a
    progress bar: the disks' copy, then the partner's resync."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..views import level_progress
    deadline = time.monotonic() + timeout
    t0 = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, disable=not show) as progress:
        task = progress.add_task(f"{name}: level {old} -> {new}", total=100)
        while time.monotonic() < deadline:
            state, frac, detail = level_progress(client.row(name), new)
            progress.update(task, completed=100 * frac, description=f"{name}: {detail}")
            if state == "done":
                return True, detail
            if state == "failed":
                events = [e for e in client.events(200)[0] if e.vm == name and e.kind == "level" and e.time >= t0]
                return False, events[-1].message if events else detail
            time.sleep(0.2)
    return False, f"not done after {timeout:.0f}s"


def _set_checkpointing(args: Any) -> int:
    """A level 3 VM's checkpoint interval/trigger; a running VM follows within seconds."""
    on_output = None if args.checkpoint_on_output is None else args.checkpoint_on_output == "on"
    changes: dict[str, Any] = {}
    if args.checkpoint_ms is not None:
        changes["checkpoint_ms"] = args.checkpoint_ms
    if on_output is not None:
        changes["checkpoint_on_output"] = on_output
    got = pool_client(args).patch(args.name, changes)
    new = VmSpec.from_json(got)
    if is_json(args):
        emit_json({"vm": args.name, "checkpoint_ms": new.checkpoint_ms,
                   "checkpoint_on_output": new.checkpoint_on_output})
    else:
        console.print(f"VM {args.name}: checkpoint every {new.checkpoint_ms} ms"
                      + (" and on output" if new.checkpoint_on_output else ""))
    return OK


def describe_monitoring(spec: VmSpec) -> str:
    probe = (f"health probe {spec.health} every {spec.health_interval_s:g} s (timeout {spec.health_timeout_s:g} s, "
             f"restart after {spec.health_failures} failures in a row, grace {spec.health_grace_s:g} s after boot)"
             if spec.health else "no health probe")
    watchdog = "; i6300esb watchdog (reset)" if spec.watchdog else ""
    return f"{probe}{watchdog}; at most {spec.guest_restarts} guest restarts per {spec.guest_window_s:g} s"


def spec_from_args(args: Any) -> VmSpec:
    disks = []
    if args.disk_size and args.level not in (2, 3):
        raise CliError("--disk-size is for levels 2 and 3; levels 0 and 1 take --disk PATH", BAD_INPUT)
    for d in args.disk or []:
        path, _, fmt = d.partition(",format=")
        disk = DiskSpec(os.path.abspath(path), fmt or ("qcow2" if path.endswith(".qcow2") else "raw"))
        # levels 2, 3: the image is imported into the first host's copy
        disks.append(ops.with_image_size(disk) if args.level in (2, 3) else disk)
    disks += [DiskSpec(size=parse_size(s)) for s in args.disk_size or []]
    macs = args.mac or [default_mac(args.name)]
    for mac in macs:
        problem = check_mac(mac)
        if problem:
            raise CliError(problem, BAD_INPUT)
    nics = tuple(NicSpec(mac, args.ip if i == 0 else None) for i, mac in enumerate(macs))
    kernel, initrd, append = args.kernel, args.initrd, args.append or ""
    if args.demo_guest:
        from ..guest.build import GuestBuildError, build_guest
        try:
            image = build_guest(log=lambda m: None)
        except GuestBuildError as e:
            raise CliError(f"demo guest: {e}", BAD_INPUT) from None
        kernel, initrd, append = str(image.kernel), str(image.initrd), image.append
    if args.level not in (0, 1, 2, 3):
        raise CliError(f"level {args.level} does not exist (0, 1, 2 or 3)", BAD_INPUT)
    if args.failback and not args.host:
        raise CliError("--failback moves the VM back to its preferred host: give --host", BAD_INPUT)
    return VmSpec(**guest_monitoring(args),
                  name=args.name, level=Level(args.level), memory_mib=args.memory, vcpus=args.vcpus,
                  disks=tuple(disks), nics=nics, checkpoint_ms=args.checkpoint_ms,
                  checkpoint_on_output=args.checkpoint_on_output == "on", sla_percent=args.sla,
                  boot=BootSpec(os.path.abspath(kernel) if kernel else None,
                                os.path.abspath(initrd) if initrd else None, append),
                  desired=Desired.RUNNING if args.start else Desired.STOPPED,
                  preferred_host=args.host, failback=args.failback, watchdog=args.watchdog, site=args.site)


def cmd_vm_add(args: Any) -> int:
    spec = spec_from_args(args)

    pool_client(args).define(spec)
    if is_json(args):
        emit_json({"added": spec.to_json()})
    else:
        console.print(f"VM {spec.name} added (level {int(spec.level)}, {spec.desired.value})")
    if args.start and args.wait:
        return _wait_state(args, spec.name, RunState.RUNNING)
    return OK


def _set_desired(args: Any, desired: Desired) -> int:
    client = pool_client(args)
    force = bool(getattr(args, "force", False))
    changed = client.set_desired(args.name, desired, force)
    if not is_json(args):
        how = " (power off at once)" if force else " (the guest is asked to shut down first)" \
            if desired is Desired.STOPPED else ""
        console.print(f"VM {args.name}: desired state {desired.value}" + (how if changed else " (unchanged)"))
        if desired is Desired.RUNNING:
            row = client.row(args.name)
            if row is not None and row.get("cannot_start"):
                console.print(f"[yellow]it cannot start now:[/] {row['cannot_start']}", highlight=False)
    if args.wait:
        return _wait_state(args, args.name, RunState.RUNNING if desired is Desired.RUNNING else None)
    if is_json(args):
        emit_json({"vm": args.name, "desired": desired.value, "changed": changed})
    return OK


def _wait_state(args: Any, name: str, want: RunState | None) -> int:
    """Wait until the VM runs (want RUNNING) or is released (want None)."""
    deadline = time.monotonic() + args.timeout
    client = pool_client(args)

    def reached(row: Mapping[str, Any]) -> bool:
        return row["state"] == want.value and row["host"] is not None if want else row["host"] is None

    while True:
        row = client.row(name)
        if row is None:
            raise CliError(f"unknown VM {name!r}", NOT_FOUND)
        if reached(row) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ok = reached(row)
    if is_json(args):
        emit_json({"vm": name, "reached": ok, "host": row["host"],
                   "state": row["state"] if row["host"] else "stopped"})
    if not ok:
        raise CliError(f"VM {name} did not reach {want.value if want else 'stopped'} within "
                       f"{args.timeout:g}s", 1)
    if not is_json(args):
        console.print(f"VM {name} is {'running on ' + row['host'] if row['host'] else 'stopped'}")
    return OK


def cmd_vm_start(args: Any) -> int:
    if args.accept_data_loss:
        _force_start(args)
    elif args.host:
        raise CliError("--host only goes with --accept-data-loss", BAD_INPUT)
    return _set_desired(args, Desired.RUNNING)


def cmd_vm_repair_disk(args: Any) -> int:
    """Tell ftvm a failed level 2 copy sits on working storage again: it is resynced in
    full from the partner while the VM runs, then mirrored."""
    pool_client(args).repair_disk(args.name, args.host)
    if is_json(args):
        emit_json({"vm": args.name, "host": args.host, "repair": "requested"})
    else:
        console.print(f"VM {args.name}: the copy on {args.host} will be resynced in full, then mirrored")
    return OK


def _force_start(args: Any) -> None:
    host = pool_client(args).force_start(args.name, args.host)
    if not is_json(args):
        console.print(f"VM {args.name}: start on {host} forced (data loss accepted, recorded in the event log)")


def cmd_vm_stop(args: Any) -> int:
    return _set_desired(args, Desired.STOPPED)


def cmd_vm_remove(args: Any) -> int:
    pool_client(args).remove(args.name)
    if is_json(args):
        emit_json({"removed": args.name})
    else:
        console.print(f"VM {args.name} removed (its disk images are kept)")
    return OK


def cmd_vm_show(args: Any) -> int:
    data = pool_client(args).vm(args.name)
    spec = VmSpec.from_json(data["spec"])
    if is_json(args):
        emit_json(data)
        return OK
    t = Table(show_header=False, title=f"VM {args.name}", title_justify="left")
    for k in ("level", "desired", "state", "host", "home", "protection", "detail", "memory_mib", "vcpus",
              "macs", "fencing_token"):
        t.add_row(k, str(data[k]))
    if spec.preferred_host:
        t.add_row("preferred host", spec.preferred_host + (" (failback on)" if spec.failback else ""))
    if spec.site:
        t.add_row("preferred site", f"{spec.site} (runs there when it can; keeps it if the sites lose each other)")
    if spec.level is Level.SYSTEM:
        t.add_row("checkpoint interval", f"{spec.checkpoint_ms} ms")
    dr = data.get("dr")
    if dr:
        verdict = "within" if dr["within_rpo"] else "[red]over[/]"
        lag = ("not shipping (VM not running)" if dr["lag_s"] is None
               else f"lag {dr['lag_s']:.1f} s {verdict} the RPO {dr['rpo_s']:g} s")
        newest = (f"; newest point {dr['newest']} ({dr['kind']}, {dr['data_bytes'] / 2**20:.1f} MiB of data, "
                  f"{dr['wire_bytes'] / 2**20:.2f} MiB sent)" if dr["newest"] else "")
        t.add_row("DR", f"to {dr['target']}: {lag}{newest}" + (f"; [red]{dr['error']}[/]" if dr["error"] else ""))
    c = data.get("checkpoints")
    if c:
        t.add_row("checkpoints", f"{c['per_s']:.1f}/s to {c['partner']}, pause p50 {c['pause_p50_ms']:.0f} ms "
                                 f"p99 {c['pause_p99_ms']:.0f} ms, {c['dirty_pages_p50']:.0f} dirty pages/epoch, "
                                 f"{c['link_bytes_per_s'] / 2**20:.2f} MiB/s on the A-link, epoch {c['epoch']}")
        if c.get("tracking"):
            full = f" ({c['full_resyncs']} checkpoints sent all of RAM)" if c.get("full_resyncs") else ""
            t.add_row("changed RAM pages", c["tracking"] + full)
        if c.get("disk_tracking"):
            t.add_row("changed disk pages", c["disk_tracking"])
    t.add_row("guest monitoring", describe_monitoring(spec))
    health = (data.get("status") or {}).get("health")
    if health:
        t.add_row("health", str(health))
    guest: dict[str, Any] = data.get("guest") or {}
    if guest.get("failures"):
        last = guest["failures"][-1]
        t.add_row("guest failures", f"{len(guest['failures'])} recorded, last: {last['cause']} on {last['host']} "
                                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['at']))}"
                  + (f"; left stopped: {guest['gave_up']}" if guest.get("gave_up") else ""))
    for d in spec.disks:
        t.add_row("disk", f"{d.path} ({d.format})")
    console.print(t)
    return OK


def cmd_vm_list(args: Any) -> int:
    rows = pool_client(args).vms()
    if is_json(args):
        emit_json(rows)
    else:
        console.print(vms_table(rows))
    return OK


# --- availability ----------------------------------------------------------------------

def _dr_text(dr: dict[str, Any] | None) -> str:
    if not dr:
        return "-"
    over = "" if dr["within_rpo"] else " [red]over[/]"
    lag = "not running" if dr["lag_s"] is None else f"{dr['lag_s']:.0f} s{over}"
    met = dr.get("rpo_met_percent")
    held = "" if met is None else f"; met {met:.2f}% of its up time ({dr.get('over_rpo_s', 0):.0f} s over)"
    return f"{dr['rpo_s']:g} s to {dr['target']} (lag now {lag}{held})"


def cmd_report(args: Any) -> int:
    """Availability per VM over a period, against each VM's SLA target."""
    if args.days <= 0:
        raise CliError("--days must be positive", BAD_INPUT)
    data = pool_client(args).availability(args.days, args.vm or [])
    if is_json(args):
        emit_json({"days": args.days, "reports": data})
        return OK
    t = Table(title=f"Availability over the last {args.days:g} days", title_justify="left")
    for col in ("VM", "Availability", "SLA", "Met", "Outages", "Failovers", "Guest failures", "Longest recovery",
                "Down (unplanned)", "DR RPO"):
        t.add_column(col)
    for d in data:
        avail = "-" if d["availability_percent"] is None else f"{d['availability_percent']:.4f}%"
        met = {None: "-", True: "[green]yes[/]", False: "[red]no[/]"}[d["meets_sla"]]
        longest = "-" if d["time_to_recover_max_s"] is None else f"{d['time_to_recover_max_s']:.2f} s"
        t.add_row(d["vm"], avail, f"{d['sla_target_percent']:g}%" if d["sla_target_percent"] else "-", met,
                  str(len(d["outages"])), str(d["failovers"]), str(d.get("guest_failures", 0)), longest,
                  f"{d['unplanned_down_s']:.2f} s", _dr_text(d.get("dr")))
    console.print(t)
    if args.vm:
        for d in data:
            for o in d["outages"]:
                end_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["end"])) if o["end"] else "ongoing"
                console.print(f"{d['vm']}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(o['start']))} -> "
                              f"{end_text} ({o['seconds']:.2f} s) {o['cause']}"
                              + (f", failover {o['from']} -> {o['to']}" if o["failover"] else ""), highlight=False)
    return OK


# --- events --------------------------------------------------------------------------

def cmd_events(args: Any) -> int:
    client = pool_client(args)
    events, rev = client.events(args.limit)
    if is_json(args) and not args.follow:
        emit_json([e.__dict__ for e in events])
        return OK
    _print_events(args, events)
    while args.follow:
        time.sleep(0.5)
        events, new_rev = client.events(10_000, since_revision=rev)
        rev = max(rev, new_rev)
        _print_events(args, events)
    return OK


def _print_events(args: Any, events: list[Event]) -> None:
    for e in events:
        if is_json(args):
            import json
            print(json.dumps(e.__dict__), flush=True)
        else:
            console.print(str(e), highlight=False, soft_wrap=True)
