"""`ftvm lab ...` and `ftvm guest build`: the simulated pool on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.timing import Timing, TimingError
from ..lab import lab
from ..lab import topology as topo
from .common import BAD_INPUT, FAILED, OK, REFUSED, CliError, console, emit_json, is_json


def _lab_dir(args: Any) -> Path:
    return Path(args.lab_dir) if getattr(args, "lab_dir", None) else lab.DEFAULT_DIR


def _state(args: Any) -> lab.LabState:
    try:
        return lab.load_state(_lab_dir(args))
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None


def timing_from_args(args: Any) -> Timing:
    overrides = {k: v for k, v in (("lease_ttl", args.lease_ttl), ("tick", args.tick),
                                   ("self_fence_margin", args.self_fence_margin),
                                   ("keepalive_interval", args.keepalive_interval)) if v is not None}
    try:
        return Timing.from_dict(overrides)
    except TimingError as e:
        raise CliError(str(e), BAD_INPUT) from None


def cmd_lab_up(args: Any) -> int:
    timing = timing_from_args(args)
    if not 2 <= args.hosts <= 4:
        raise CliError("a lab has 2 to 4 hosts", BAD_INPUT)
    from ..guest.build import GuestBuildError, build_guest
    try:
        probe_kernel = str(build_guest(log=lambda m: console.print(m)).kernel)
    except GuestBuildError as e:
        raise CliError(f"demo guest: {e}", FAILED) from None
    try:
        with console.status(f"bringing up a lab pool with {args.hosts} hosts"):
            state = lab.up(args.hosts, _lab_dir(args), timing, args.host_memory, args.host_vcpus,
                           probe_kernel, sites=args.sites, dr=args.dr, etcd_members=args.etcd_members)
    except lab.LabError as e:
        raise CliError(str(e), FAILED) from None
    if is_json(args):
        emit_json({"hosts": state.hosts, "etcd": state.etcd_endpoint, "dir": state.dir, "sites": state.sites,
                   "dr_hosts": state.dr_hosts, "dr_etcd": state.dr_etcd_endpoint if state.dr_hosts else None,
                   "dr_receivers": [topo.dr_receiver(h) for h in state.dr_hosts]})
    else:
        where = (" (" + ", ".join(f"{h} at site {s}" for h, s in state.sites.items()) + "; quorum at the witness site)"
                 if state.sites else "")
        console.print(f"lab up: hosts {', '.join(state.hosts)}{where}, quorum (etcd) at {state.etcd_endpoint}, "
                      f"shared storage {state.shared_dir}")
        if state.dr_hosts:
            receivers = ",".join(topo.dr_receiver(h) for h in state.dr_hosts)
            console.print(f"DR site: pool {lab.DR_POOL} (hosts {', '.join(state.dr_hosts)}, its own etcd at "
                          f"{state.dr_etcd_endpoint}) behind a WAN link (`ftvm lab wan --rtt 40ms --rate 150mbit`). "
                          f"Pair them: `ftvm dr target add {lab.DR_POOL} --receiver {receivers}`; act on the DR "
                          "pool with `ftvm --lab-dr ...`")
    return OK


def cmd_lab_down(args: Any) -> int:
    removed = lab.down(_lab_dir(args))
    if is_json(args):
        emit_json({"removed": removed})
    else:
        console.print("lab down: " + (f"removed {len(removed)} items" if removed else "nothing to remove"))
    return OK


def _host_op(args: Any, op: str) -> int:
    state = _state(args)
    try:
        if op == "fail":
            at = lab.fail_host(state, args.host)
            msg = f"{args.host} lost power at {at:.3f}"
        elif op == "restore":
            lab.restore_host(state, args.host)
            msg = f"{args.host} powered on; its agent is starting"
        elif op == "partition":
            lab.partition(state, args.host, args.from_)
            msg = f"{args.host} cut off from {args.from_}"
        else:
            lab.heal(state, args.host, args.from_)
            msg = f"{args.host} reconnected to {args.from_}"
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None
    return _done(args, msg)


def _done(args: Any, msg: str) -> int:
    """A lab fault's outcome, as every lab command reports one."""
    if is_json(args):
        emit_json({"ok": True, "message": msg})
    else:
        console.print(msg)
    return OK


def cmd_lab_fail(args: Any) -> int:
    return _host_op(args, "fail")


def cmd_lab_restore(args: Any) -> int:
    return _host_op(args, "restore")


def cmd_lab_partition(args: Any) -> int:
    return _host_op(args, "partition")


def cmd_lab_heal(args: Any) -> int:
    return _host_op(args, "heal")


def cmd_lab_fail_disk(args: Any) -> int:
    from ..lab.faults import fail_disk
    state = _state(args)
    try:
        failed = fail_disk(state, args.vm, args.host)
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None
    if is_json(args):
        emit_json({"failed": failed})
    else:
        console.print(f"local disk of {args.vm} on {args.host} now fails every I/O: {', '.join(failed)}")
    return OK


def cmd_lab_a_link(args: Any) -> int:
    state = _state(args)
    try:
        lab.set_a_link(state, args.a, args.b, args.link, up=args.state == "up")
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None
    return _done(args, f"A-link {args.link} between {args.a} and {args.b} is {args.state}")


def _site_op(args: Any, what: str) -> int:
    state = _state(args)
    try:
        if what == "fail":
            lab.fail_site(state, args.site)
            msg = f"site {args.site} lost power ({', '.join(lab.site_hosts(state, args.site))})"
        elif what == "restore":
            lab.restore_site(state, args.site)
            msg = f"site {args.site} powered on again"
        else:
            lab.cut_sites(state, args.state == "down")
            msg = "the A-links between the sites are " + args.state
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None
    return _done(args, msg)


def parse_rtt_ms(text: str) -> float:
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            return float(t[:-2])
        if t.endswith("us"):
            return float(t[:-2]) / 1000
        if t.endswith("s"):
            return float(t[:-1]) * 1000
        return float(t)
    except ValueError:
        raise CliError(f"--rtt {text!r}: use e.g. 10ms", BAD_INPUT) from None


def parse_rate_mbit(text: str) -> float:
    t = text.strip().lower().removesuffix("/s").removesuffix("ps")
    units = {"gbit": 1000.0, "mbit": 1.0, "kbit": 0.001, "g": 1000.0, "m": 1.0, "k": 0.001}
    try:
        for unit, factor in units.items():
            if t.endswith(unit):
                return float(t[:-len(unit)]) * factor
        return float(t) / 1_000_000  # bits per second
    except ValueError:
        raise CliError(f"--rate {text!r}: use e.g. 150mbit or 1gbit", BAD_INPUT) from None


def cmd_lab_link(args: Any) -> int:
    state = _state(args)
    rtt, rate = parse_rtt_ms(args.rtt), parse_rate_mbit(args.rate)
    sites = set(state.sites.values())
    if {args.site_a, args.site_b} != sites or len(sites) != 2:
        raise CliError(f"the lab's sites are {', '.join(sorted(sites)) or 'none (lab up --sites 2)'}: "
                       "give both", BAD_INPUT)
    try:
        lab.set_metro(state, rtt, rate)
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None
    msg = (f"between sites {args.site_a} and {args.site_b}: RTT {rtt:g} ms, "
           + (f"{rate:g} Mbit/s" if rate else "no rate limit"))
    if is_json(args):
        emit_json({"rtt_ms": rtt, "rate_mbit": rate})
    else:
        console.print(msg)
    return OK


def cmd_lab_wan(args: Any) -> int:
    state = _state(args)
    rtt, rate = parse_rtt_ms(args.rtt), parse_rate_mbit(args.rate)
    try:
        lab.set_wan(state, rtt, rate)
    except lab.LabError as e:
        raise CliError(str(e), BAD_INPUT) from None
    if is_json(args):
        emit_json({"rtt_ms": rtt, "rate_mbit": rate})
    else:
        console.print(f"WAN to the DR site: RTT {rtt:g} ms, " + (f"{rate:g} Mbit/s" if rate else "no rate limit"))
    return OK


def cmd_lab_fail_site(args: Any) -> int:
    return _site_op(args, "fail")


def cmd_lab_restore_site(args: Any) -> int:
    return _site_op(args, "restore")


def cmd_lab_cut_sites(args: Any) -> int:
    return _site_op(args, "cut")


def cmd_lab_status(args: Any) -> int:
    state = _state(args)
    data = {"hosts": state.hosts, "failed": state.failed, "partitions": state.partitions,
            "etcd": state.etcd_endpoint, "dir": state.dir, "pids": state.pids, "sites": state.sites,
            "sites_cut": state.sites_cut, "metro_rtt_ms": state.metro[0], "metro_rate_mbit": state.metro[1],
            "dr_hosts": state.dr_hosts, "wan_rtt_ms": state.wan[0], "wan_rate_mbit": state.wan[1]}
    if is_json(args):
        emit_json(data)
    else:
        for k, v in data.items():
            console.print(f"{k:<11} {v}", highlight=False)
    return OK


def cmd_guest_build(args: Any) -> int:
    from ..guest.build import GuestBuildError, build_guest
    try:
        image = build_guest(log=lambda m: None if is_json(args) else console.print(m))
    except GuestBuildError as e:
        raise CliError(str(e), FAILED) from None
    if is_json(args):
        emit_json(image.to_json())
    else:
        console.print(f"demo guest: kernel {image.kernel}, initrd {image.initrd}")
    return OK


def cmd_guest_boot_disk(args: Any) -> int:
    from pathlib import Path

    from ..core.model import check_nic_ip
    from ..guest.bootdisk import MIN_SIZE_MIB, make_boot_disk
    from ..guest.build import GuestBuildError, build_guest
    from .pool_cmds import parse_size
    if args.ip and check_nic_ip(args.ip):
        raise CliError(str(check_nic_ip(args.ip)), BAD_INPUT)
    size = parse_size(args.size)
    if size < MIN_SIZE_MIB << 20:
        raise CliError(f"--size {args.size}: a boot disk needs at least {MIN_SIZE_MIB} MiB", BAD_INPUT)
    try:
        image = build_guest(log=lambda m: None if is_json(args) else console.print(m))
        disk = make_boot_disk(Path(args.path), image, args.ip, size >> 20)
    except FileExistsError as e:
        raise CliError(f"{e}: nothing changed", REFUSED) from None
    except GuestBuildError as e:
        raise CliError(str(e), FAILED) from None
    if is_json(args):
        emit_json({"path": str(disk.path), "ledger_offset": disk.ledger_offset, "ip": args.ip})
    else:
        console.print(f"boot disk {disk.path}: syslinux + the demo guest, ledger at byte {disk.ledger_offset}; "
                      f"use it as a VM's first disk, with no --kernel")
    return OK


def cmd_lab_campaign(args: Any) -> int:
    """Random fault cycles against the running lab (3 hosts or more), every invariant checked."""
    from ..guest.build import GuestBuildError, build_guest
    from ..lab.campaign import FAULTS, dump, recorded_schedule, render, run_campaign
    from ..lab.scenario import ScenarioError
    state = _state(args)
    try:
        levels = tuple(sorted({int(x) for x in args.levels.split(",")}))
    except ValueError:
        raise CliError(f"--levels {args.levels!r}: levels 1, 2 or 3, comma separated", BAD_INPUT) from None
    if not levels or any(x not in (1, 2, 3) for x in levels):
        raise CliError(f"--levels {args.levels!r}: levels 1, 2 or 3, comma separated", BAD_INPUT)
    if args.cycles < 1:
        raise CliError("--cycles must be at least 1", BAD_INPUT)
    recorded = Path(state.dir) / f"campaign-seed{args.seed}.json"
    replay = None
    if args.replay:
        try:
            seed, replay = recorded_schedule(recorded)
        except ValueError as e:
            raise CliError(f"nothing to replay for seed {args.seed}: {e}", BAD_INPUT) from None
        if seed != args.seed:
            raise CliError(f"{recorded} is seed {seed}'s report, not seed {args.seed}'s", BAD_INPUT)
    out = recorded.with_name(f"campaign-seed{args.seed}-replay.json") if replay is not None else recorded
    try:
        image = build_guest(log=lambda m: None if is_json(args) else console.print(m))
        report = run_campaign(state, image, args.seed, args.cycles, levels,
                              progress=(lambda m: None) if is_json(args) else
                              (lambda m: console.print(m, highlight=False)), replay=replay, report_to=out)
    except (GuestBuildError, ScenarioError, lab.LabError) as e:
        raise CliError(str(e), FAILED) from None
    dump(report, out)
    if is_json(args):
        emit_json(report.to_json())
    else:
        console.print(render(report), highlight=False)
        console.print(f"(faults drawn from: {', '.join(FAULTS)}; the whole schedule: {out})", highlight=False)
    return FAILED if report.violations else OK
