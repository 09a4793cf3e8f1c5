"""The `ftvm` command: argument parsing and dispatch (commands live beside this file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import console_cmds, dr_cmds, lab_cmds, move_cmds, pool_cmds
from .common import BAD_INPUT, main_guard


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table",
                   help="output format (default: table)")
    p.add_argument("--etcd", help="quorum service endpoint(s), comma separated (default: FTVM_ETCD or the lab)")
    p.add_argument("--pool", help="pool name (default: FTVM_POOL or 'lab')")
    p.add_argument("--lab-dir", help=argparse.SUPPRESS)
    p.add_argument("--lab-dr", action="store_true",
                   help="in a lab with a DR site (`lab up --dr`): act on its DR pool, not the main one")
    p.add_argument("--api", help="agent API URL(s), comma separated (default: FTVM_API, or the lab's agents); "
                                 "the CLI then works through the API")
    p.add_argument("--api-token-file", help="file holding the API token (default: FTVM_API_TOKEN_FILE, "
                                            "FTVM_API_TOKEN, or the lab's)")
    p.add_argument("--ca", help="the pool CA, to verify etcd and the API over https (default: FTVM_CA, "
                                "or the lab's)")
    p.add_argument("--etcd-cert", help="with --etcd: the client certificate etcd asks for (default: "
                                       "FTVM_ETCD_CERT); its key in the same path with .key")
    p.add_argument("--direct", action="store_true",
                   help="talk to the quorum service (etcd) directly, not through an agent's API")


def _guest_monitoring_args(p: argparse.ArgumentParser) -> None:
    """A guest's own failures: the health probe and the restart limit (vm add, vm set)."""
    p.add_argument("--health", metavar="PROBE",
                   help="probe the guest's service from the host running it: tcp:PORT or http:PORT/PATH "
                        "(off: no probe); failing --health-failures times in a row restarts the guest")
    p.add_argument("--health-interval", metavar="TIME", help="time between probes (default 10s)")
    p.add_argument("--health-timeout", metavar="TIME", help="a probe fails without an answer within this (default 3s)")
    p.add_argument("--health-failures", type=int, metavar="N", help="failures in a row that restart (default 3)")
    p.add_argument("--health-grace", metavar="TIME", help="no probe counts this long after the guest boots "
                                                           "(default 2m)")
    p.add_argument("--guest-restarts", type=int, metavar="K",
                   help="restarts after guest failures (panic, watchdog, probe) allowed per --guest-window; "
                        "past that the VM is left stopped (default 3)")
    p.add_argument("--guest-window", metavar="TIME", help="the window of --guest-restarts (default 1h)")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ftvm", description="Fault tolerance for QEMU virtual machines.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: argparse._SubParsersAction, name: str, fn, help: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
        p = parent.add_parser(name, help=help, description=help)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    cmd(sub, "status", pool_cmds.cmd_status, "one-screen pool status")

    p = sub.add_parser("agent", help="run the host agent")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=None)

    pool = sub.add_parser("pool", help="making a pool").add_subparsers(dest="sub", required=True)
    p = cmd(pool, "init", pool_cmds.cmd_pool_init,
            "make a new pool's CA, certificates, secret and API tokens in DIR (docs/security.md)")
    p.add_argument("dir")
    p.add_argument("--etcd-addr", dest="etcd_addr", action="append", default=[], metavar="ADDR",
                   help="an address (IP or DNS name) of the quorum service, for its certificate (repeat)")
    p.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME=ADDR",
                   help="a host and the address its API listens on (repeat)")
    host = sub.add_parser("host", help="hosts of the pool").add_subparsers(dest="sub", required=True)
    cmd(host, "list", pool_cmds.cmd_host_list, "list live hosts")
    p = cmd(host, "maintenance", move_cmds.cmd_host_maintenance,
            "move every VM off a host live, then place nothing on it")
    p.add_argument("host")
    p.add_argument("--reason", default="maintenance")
    p.add_argument("--wait", action="store_true", help="follow the migrations (a progress bar per VM)")
    p.add_argument("--timeout", type=float, default=300)
    p = cmd(host, "resume", move_cmds.cmd_host_resume, "end a host's maintenance")
    p.add_argument("host")

    vm = sub.add_parser("vm", help="virtual machines").add_subparsers(dest="sub", required=True)
    p = cmd(vm, "add", pool_cmds.cmd_vm_add, "define a VM")
    p.add_argument("name")
    p.add_argument("--level", type=int, default=1, help="protection level (0, 1, 2 or 3)")
    p.add_argument("--checkpoint-ms", type=int, default=100,
                   help="level 3: longest time the guest runs between checkpoints (output waits up to this long)")
    p.add_argument("--checkpoint-on-output", choices=("on", "off"), default="on",
                   help="level 3: also checkpoint as soon as the guest sends (default on: replies wait a few ms; "
                        "off: up to --checkpoint-ms, with fewer pauses)")
    p.add_argument("--sla", type=float, help="availability target in percent, e.g. 99.99 (for reports)")
    p.add_argument("--failback", action="store_true",
                   help="move the VM back live to --host whenever that host can run it again")
    p.add_argument("--memory", type=int, default=256, help="MiB")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--disk", action="append",
                   help="PATH[,format=raw|qcow2] (repeatable); levels 2, 3: imported into the hosts' copies")
    p.add_argument("--disk-size", action="append",
                   help="levels 2, 3: size of a disk kept on each host's local storage, e.g. 64M (repeatable)")
    p.add_argument("--mac", action="append", help="NIC MAC address (repeatable; default derived from name)")
    p.add_argument("--ip", help="ADDR/PREFIX given to the demo guest on its kernel command line")
    p.add_argument("--kernel")
    p.add_argument("--initrd")
    p.add_argument("--append", help="kernel command line")
    p.add_argument("--demo-guest", action="store_true", help="boot the ftvm demo guest (ledger)")
    _guest_monitoring_args(p)
    p.add_argument("--watchdog", action="store_true",
                   help="an i6300esb watchdog device: when the guest's watchdog daemon stops kicking it, "
                        "the guest is reset (a guest failure, within --guest-restarts)")
    p.add_argument("--host", help="preferred host for the first start")
    p.add_argument("--site", default="",
                   help="SplitSite: the site the VM runs at when it can, and which keeps it when the sites "
                        "lose each other (default: the side running it)")
    p.add_argument("--start", action="store_true", help="start it right away")
    p.add_argument("--wait", action="store_true", help="with --start: wait until it runs")
    p.add_argument("--timeout", type=float, default=60)
    for name, fn, text in (("start", pool_cmds.cmd_vm_start, "start a VM"),
                           ("stop", pool_cmds.cmd_vm_stop, "stop a VM")):
        p = cmd(vm, name, fn, text)
        p.add_argument("name")
        p.add_argument("--wait", action="store_true", help="wait until done")
        p.add_argument("--timeout", type=float, default=60)
        if name == "stop":
            p.add_argument("--force", action="store_true",
                           help="power off at once (default: ACPI power button, then the agent's stop_grace)")
        if name == "start":
            p.add_argument("--accept-data-loss", action="store_true",
                           help="level 2: start from a copy that is not current (recorded in the event log)")
            p.add_argument("--host", help="with --accept-data-loss: the host whose copy to start from")
    p = cmd(vm, "set", pool_cmds.cmd_vm_set,
            "change a VM's protection level (a running VM: online, no restart), a level 3 VM's "
            "checkpointing, or its SLA target")
    p.add_argument("name")
    p.add_argument("--level", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--disk-path", action="append",
                   help="level 2 -> 1: the shared-storage image a disk moves to (once per disk; default: "
                        "the image it was imported from)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --disk-path: replace an image that already exists there (its contents are lost)")
    p.add_argument("--wait", action="store_true", help="follow an online change until done (raise: protected)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--checkpoint-ms", type=int, help="level 3: longest time between checkpoints")
    p.add_argument("--checkpoint-on-output", choices=("on", "off"),
                   help="level 3: also checkpoint as soon as the guest sends")
    p.add_argument("--sla", type=float, help="availability target in percent for reports (0: none)")
    p.add_argument("--failback", choices=("on", "off"),
                   help="move the VM back live to its preferred host whenever that host can run it again")
    p.add_argument("--site", help="SplitSite: the VM's preferred site (none: no preference)")
    _guest_monitoring_args(p)
    p = cmd(vm, "repair-disk", pool_cmds.cmd_vm_repair_disk,
            "level 2: a failed copy's storage works again (replaced disk): resync it and mirror again")
    p.add_argument("name")
    p.add_argument("--host", required=True)
    p = cmd(vm, "migrate", move_cmds.cmd_vm_migrate, "move a running VM to another host live")
    p.add_argument("name")
    p.add_argument("--to", required=True, help="the target host")
    p.add_argument("--wait", action="store_true", help="follow it (a progress bar)")
    p.add_argument("--timeout", type=float, default=300)
    p = cmd(vm, "remove", pool_cmds.cmd_vm_remove, "remove a stopped VM (its disks are kept)")
    p.add_argument("name")
    p = cmd(vm, "console", console_cmds.cmd_vm_console,
            "the VM's serial console, wherever it runs (Ctrl-] detaches; through the agents' API)")
    p.add_argument("name")
    p.add_argument("--takeover", action="store_true", help="end a console session someone else has open")
    p = cmd(vm, "log", console_cmds.cmd_vm_log, "the VM's serial log since its QEMU started")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing, wherever the VM runs next")
    p.add_argument("--all", action="store_true", help="from the start (default: the last 16 KiB)")
    p = cmd(vm, "show", pool_cmds.cmd_vm_show, "show one VM")
    p.add_argument("name")
    cmd(vm, "list", pool_cmds.cmd_vm_list, "list VMs")

    p = cmd(sub, "report", pool_cmds.cmd_report, "availability per VM (uptime, outages, failovers, SLA)")
    p.add_argument("vm", nargs="*", help="VMs (default: all); with names, each outage is listed")
    p.add_argument("--days", type=float, default=30, help="the period: the last N days")
    p = cmd(sub, "events", pool_cmds.cmd_events, "the event log: every decision with its reason")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("-f", "--follow", action="store_true")

    lab = sub.add_parser("lab", help="a simulated pool in network namespaces").add_subparsers(
        dest="sub", required=True)
    p = cmd(lab, "up", lab_cmds.cmd_lab_up, "bring up a lab pool")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--sites", type=int, default=0, choices=(0, 2),
                   help="2: the hosts at two sites (a: the first half, b: the rest), the quorum at a third")
    p.add_argument("--dr", action="store_true",
                   help="a DR site too: pool 'dr' (hosts h8, h9, its own etcd) behind a WAN link (`lab wan`)")
    p.add_argument("--etcd-members", type=int, default=1, choices=(1, 3),
                   help="3: the quorum service is a 3-member etcd (one member can fail; the campaign's faults)")
    p.add_argument("--host-memory", type=int, default=2048, help="MiB each host offers")
    p.add_argument("--host-vcpus", type=int, default=4)
    p.add_argument("--lease-ttl", type=float)
    p.add_argument("--tick", type=float)
    p.add_argument("--keepalive-interval", type=float)
    p.add_argument("--self-fence-margin", type=float)
    cmd(lab, "down", lab_cmds.cmd_lab_down, "remove the lab and everything it runs")
    cmd(lab, "status", lab_cmds.cmd_lab_status, "what the lab is made of")
    for name, fn, text in (("fail-host", lab_cmds.cmd_lab_fail, "power loss: kill everything, links down"),
                           ("restore-host", lab_cmds.cmd_lab_restore, "power back on")):
        p = cmd(lab, name, fn, text)
        p.add_argument("host")
    for name, fn, text in (("partition", lab_cmds.cmd_lab_partition, "cut one path of a host"),
                           ("heal", lab_cmds.cmd_lab_heal, "restore one path of a host")):
        p = cmd(lab, name, fn, text)
        p.add_argument("host")
        p.add_argument("--from", dest="from_", required=True, choices=("quorum", "lan"))

    for name, fn, text in (("fail-site", lab_cmds.cmd_lab_fail_site, "a site loses power: each of its hosts"),
                           ("restore-site", lab_cmds.cmd_lab_restore_site, "power back on at a site")):
        p = cmd(lab, name, fn, text)
        p.add_argument("site")
    p = cmd(lab, "cut-sites", lab_cmds.cmd_lab_cut_sites,
            "every A-link between the two sites down (up: back); each still reaches the quorum")
    p.add_argument("state", choices=("down", "up"))
    p = cmd(lab, "link", lab_cmds.cmd_lab_link,
            "the metro link between the two sites: round-trip time and rate, changed while the lab runs")
    p.add_argument("site_a")
    p.add_argument("site_b")
    p.add_argument("--rtt", default="0ms", help="round-trip time, e.g. 10ms (each way half)")
    p.add_argument("--rate", default="0", help="bandwidth each way, e.g. 150mbit or 1gbit (0: unlimited)")
    p = cmd(lab, "wan", lab_cmds.cmd_lab_wan,
            "the WAN link to the DR site (`lab up --dr`): round-trip time and rate, changed while the lab runs")
    p.add_argument("--rtt", default="0ms", help="round-trip time, e.g. 40ms (each way half)")
    p.add_argument("--rate", default="0", help="bandwidth each way, e.g. 150mbit or 20mbit (0: unlimited)")
    p = cmd(lab, "fail-disk", lab_cmds.cmd_lab_fail_disk, "make a level 2 VM's local disk fail (EIO)")
    p.add_argument("vm")
    p.add_argument("--host", required=True, help="the host whose copy fails")
    p = cmd(lab, "a-link", lab_cmds.cmd_lab_a_link, "take one A-link between two hosts down or up")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("state", choices=("up", "down"))
    p.add_argument("--link", type=int, default=1, help="which of the pair's A-links (1 or 2)")

    p = cmd(lab, "campaign", lab_cmds.cmd_lab_campaign,
            "random fault cycles against the running lab (3 hosts or more), with clients writing at each level; "
            "every invariant checked after each cycle; the report is kept as campaign-seed<S>.json in the lab dir")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--replay", action="store_true",
                   help="run the faults recorded in seed S's report again, cycle by cycle (--cycles K: the first K)")
    p.add_argument("--levels", default="1,2,3", help="the levels to run a VM at, comma separated (default 1,2,3)")

    dr = sub.add_parser("dr", help="asynchronous disaster recovery").add_subparsers(dest="sub", required=True)
    p = cmd(dr, "model", dr_cmds.cmd_dr_model,
            "predict the lag (RPO) a link gives a write-rate trace, or the bandwidth an RPO needs")
    p.add_argument("vm", nargs="?", help="a VM whose write-rate trace (recorded by the agent running it) to use")
    p.add_argument("--trace", help="a trace file: one line per second, `seconds,bytes` or `bytes` written")
    p.add_argument("--bandwidth", help="the WAN link's rate, e.g. 150mbit")
    p.add_argument("--rtt", default="0ms", help="its round trip, e.g. 40ms")
    p.add_argument("--interval", default="10s", help="how often a recovery point is closed (default 10s)")
    p.add_argument("--compression", type=float,
                   help="bytes sent per byte written (0.4: the writes compress 2.5:1; default: what the VM's DR "
                        "points achieved, else 1)")
    p.add_argument("--last", default="1h", help="with a VM: the newest part of its trace to use (default 1h)")
    p.add_argument("--unique", type=float, default=1.0,
                   help="share of written bytes that are distinct blocks within a point (default 1)")
    p.add_argument("--rpo", help="a p99 lag target, e.g. 30s: prints the bandwidth it needs")
    p.add_argument("--svg", help="write the predicted lag over time to this SVG file")

    p = cmd(dr, "add", dr_cmds.cmd_dr_add, "protect a VM at a DR target: its owner ships recovery points there")
    p.add_argument("name")
    p.add_argument("--to", required=True, help="the DR target (`ftvm dr target add`)")
    p.add_argument("--rpo", default="30s", help="the RPO its lag is held against, e.g. 10s (default 30s)")
    p = cmd(dr, "remove", dr_cmds.cmd_dr_remove, "stop DR replication of a VM (the DR site keeps its points)")
    p.add_argument("name")
    from_help = "the VM's own pool, when several pools' VMs have that name"
    p = cmd(dr, "points", dr_cmds.cmd_dr_points,
            "the recovery points this pool keeps of a VM (ask the DR pool: --pool/--etcd or its API)")
    p.add_argument("name")
    p.add_argument("--from", dest="source", help=from_help)
    p = cmd(dr, "test", dr_cmds.cmd_dr_test, "test failover at the DR pool: a copy of a point, isolated, while "
            "replication goes on")
    p.add_argument("name")
    p.add_argument("--point", type=int, help="the point (`ftvm dr points`; default the newest)")
    p.add_argument("--from", dest="source", help=from_help)
    p = cmd(dr, "test-end", dr_cmds.cmd_dr_test_end, "end a test failover: its copy and images are removed")
    p.add_argument("name")
    p.add_argument("--from", dest="source", help=from_help)
    p = cmd(dr, "failover", dr_cmds.cmd_dr_failover, "start a VM at the DR pool from a recovery point (its site is "
            "lost): says what is lost; the old site never runs it again without a failback")
    p.add_argument("name")
    p.add_argument("--point", type=int, help="the point (`ftvm dr points`; default the newest)")
    p.add_argument("--from", dest="source", help=from_help)
    p.add_argument("--accept-data-loss", action="store_true",
                   help="required: the writes after the point are lost (the refusal without it says how many)")
    p.add_argument("--level", type=int, default=0, choices=(0, 2, 3),
                   help="the level it runs at in this pool (started at 0 on the images, then raised online)")
    p = cmd(dr, "failback", dr_cmds.cmd_dr_failback, "at the DR pool, for a VM failed over here: send its writes "
            "back to its home pool (--to), then switch over (--switch): paused, last point shipped, started there")
    p.add_argument("name")
    p.add_argument("--to", help="the DR target (here) naming the home pool's receivers")
    p.add_argument("--rpo", default="9s", help="the RPO of the way back (default 9s)")
    p.add_argument("--switch", action="store_true", help="the switchover, once the way back caught up")
    p.add_argument("--from", dest="source", help=from_help)
    target = dr.add_parser("target", help="where this pool's recovery points may go").add_subparsers(
        dest="target_sub", required=True)
    p = cmd(target, "add", dr_cmds.cmd_dr_target_add, "add or change a DR target: another pool's receivers")
    p.add_argument("name")
    p.add_argument("--receiver", action="append", required=True, metavar="ADDR:PORT",
                   help="a DR pool host's dr_listen address (repeat; tried in order)")
    p = cmd(target, "remove", dr_cmds.cmd_dr_target_remove, "remove a DR target no VM uses")
    p.add_argument("name")
    cmd(target, "list", dr_cmds.cmd_dr_target_list, "the DR targets")

    guest = sub.add_parser("guest", help="the demo guest").add_subparsers(dest="sub", required=True)
    cmd(guest, "build", lab_cmds.cmd_guest_build, "build (or find cached) the demo guest")
    p = cmd(guest, "boot-disk", lab_cmds.cmd_guest_boot_disk,
            "a disk that boots the demo guest by itself (BIOS, syslinux; the ledger on partition 2)")
    p.add_argument("path")
    p.add_argument("--ip", help="ADDR/PREFIX the guest takes (written into the disk's boot configuration)")
    p.add_argument("--size", default="128M", help="disk size (at least 67M)")

    from ..sim.runner import cmd_sim
    p = sub.add_parser("sim", help="the control plane simulated through random fault schedules",
                       description="The real decision core and store code on an in-memory etcd, driven by "
                                   "simulated agents on a simulated clock through random schedules of host "
                                   "losses, quorum cuts, A-link cuts and lost etcd requests; every invariant "
                                   "checked after each step (docs/architecture.md, 'The simulator').")
    p.add_argument("--schedules", type=int, default=1000, help="how many schedules (seeds) to run (default 1000)")
    p.add_argument("--from", dest="first", type=int, default=0, metavar="SEED", help="the first seed (default 0)")
    p.add_argument("--steps", type=int, default=300, help="steps with faults per schedule (default 300)")
    p.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--replay", type=int, metavar="SEED", help="run one seed and print its faults and trace")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(fn=cmd_sim)

    from ..showcase import bench, demo
    p = cmd(sub, "demo", demo.cmd_demo, "the live demo in a lab pool")
    p.add_argument("--level", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--splitsite", action="store_true",
                   help="SplitSite: a level 3 and a level 2 VM at site a, partners at site b, the quorum at a "
                        "third site; site a loses power")
    p.add_argument("--dr", action="store_true",
                   help="disaster recovery: a level 2 VM ships recovery points to a DR pool over a WAN link; the "
                        "main site is lost; the DR pool starts the VM from its newest point, stating the loss")
    p.add_argument("--rtt", default="2ms", help="with --splitsite: the metro link's round trip (e.g. 5ms)")
    p.add_argument("--rate", default="0", help="with --splitsite: the metro link's rate (e.g. 150mbit; 0 unlimited)")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p = cmd(sub, "bench", bench.cmd_bench, "benchmarks in a lab pool")
    p.add_argument("what", choices=("failover", "migration", "control-plane", "splitsite", "dr"),
                   help="failover: failover figures at --level 1, 2 or 3 (2: also L0 vs L2 writes and resync; "
                        "3: L0/L2/L3 requests and the checkpoint engine); migration: live migration of a loaded VM; "
                        "control-plane: tick time and etcd requests/s of a 4-host pool with 2, 12, 52 VMs; "
                        "splitsite: levels 0/2/3 across a metro link at RTT 0-10 ms and 1 Gbit/s vs 150 Mbit/s, "
                        "then a site's loss at levels 1, 2, 3; dr: DR lag, bytes and guest latency with DR on vs "
                        "off over a WAN link at 150 and 20 Mbit/s, and the modeler's prediction")
    p.add_argument("--level", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--write-mib", type=int, default=64, help="level 2: MiB per bulk write round")
    p.add_argument("--part", action="append", choices=("requests", "sizes", "failover"),
                   help="level 3: measure only this part (repeatable; default all, side by side in one run)")
    return top


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "agent":
        from ..agent.main import run_agent
        return run_agent(args.config, args.verbose)
    return main_guard(lambda: args.fn(args))


def entry() -> None:
    try:
        sys.exit(main())
    except SystemExit as e:  # argparse usage errors exit 2 == BAD_INPUT
        if e.code not in (None, 0) and not isinstance(e.code, int):
            sys.exit(BAD_INPUT)
        raise
