"""`ftvm demo --level N` (or `--splitsite`, `--dr`): a story, live in the terminal, in a fresh lab pool."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..cli.common import BAD_INPUT, FAILED, OK, CliError, console, emit_json, is_json
from ..cli.pool_cmds import hosts_table, vms_table
from ..views import status_data
from ..guest.build import GuestBuildError, build_guest
from ..lab import lab as labmod
from ..lab.client import read_log
from ..core.timing import Timing
from ..lab.dr_story import DrStory, dr_story
from ..lab.splitsite_story import SplitSiteStory, splitsite_story
from ..lab.scenario import (FailoverResult, LabPool, Level2Result, Level3Story, ScenarioError, ensure_root,
                           level1_failover, level2_story, level3_story)

TITLES = {1: "ftvm demo: Level 1 restart", 2: "ftvm demo: Level 2 component fault tolerance",
          3: "ftvm demo: Level 3 system fault tolerance (beside Level 1)"}
SPLITSITE_TITLE = "ftvm demo: SplitSite (partners at another site, the quorum at a third)"
DR_TITLE = "ftvm demo: disaster recovery (recovery points to another pool over a WAN link)"
DEMO_DR_CONFIRM_S = 15.0  # (60 s by default: the demo's DR failover waits 25 s of silence, not 70)
Result = FailoverResult | Level2Result | Level3Story | SplitSiteStory | DrStory

log = logging.getLogger("ftvm.demo")


class LiveView:
    """Steps so far plus the pool's status, refreshed from the store twice a second."""

    def __init__(self, pool: LabPool | None, title: str) -> None:
        self.pool = pool
        self.title = title
        self.steps: list[tuple[float, str]] = []
        self.t0 = time.time()
        self._status: Any = Text("starting…")
        self._client = Text("")
        self._stop = threading.Event()

    def step(self, message: str) -> None:
        self.steps.append((time.time() - self.t0, message))

    def poll(self) -> None:
        while not self._stop.wait(0.5):
            if self.pool is None:
                continue
            self._client = self._client_line()
            try:
                data = status_data(self.pool.snapshot(), [self.pool.state.etcd_endpoint], labmod.POOL)
                self._status = Group(hosts_table(data["hosts"]), vms_table(data["vms"]))
            except Exception as e:  # keep the demo going while etcd is briefly away
                self._status = Text(f"status unavailable: {e}")

    def _client_line(self) -> Text:
        """The lab client's view: acknowledgements so far and the time since the last one."""
        assert self.pool is not None
        logs = sorted(Path(self.pool.state.dir).glob("client-*.jsonl"))
        if not logs:
            return Text("")
        acks = read_log(logs[-1])[0]
        if not acks:
            return Text("client: connecting…")
        silent = time.time() - acks[-1].t
        style = "green" if silent < 1 else "bold red"
        return Text.assemble("client: ", (f"{len(acks)} acknowledged writes", "bold"),
                             ", last answer ", (f"{silent:.1f} s ago", style))

    def render(self) -> Group:
        lines = Text()
        for t, msg in self.steps[-12:]:
            lines.append(f"{t:7.2f}s  ", style="dim")
            lines.append(msg + "\n")
        return Group(Panel(lines, title=self.title), self._client, self._status)

    def stop(self) -> None:
        self._stop.set()


def _splitsite_rows(story: SplitSiteStory) -> list[tuple[str, str]]:
    rate = f", {story.rate_mbit:g} Mbit/s" if story.rate_mbit else ""
    rows = [("sites", ", ".join(f"{h} at {s}" for h, s in sorted(story.sites.items())) + "; quorum at a third"),
            ("metro link", f"{story.rtt_ms:g} ms round trip{rate}")]
    for v in story.vms:
        lost = f"[{'green' if v.lost == 0 else 'red'}]{v.lost}[/]"
        how = ("carried on from its last checkpoint, connection " + ("[green]kept[/]" if v.connections == 1
                                                                     else f"[red]reset[/] ({v.connections})")
               if v.level == 3 else f"restarted from its copy (lease TTL {story.lease_ttl_s:g} s + boot)")
        rows += [(f"level {v.level} VM {v.vm}", f"{v.before} -> {v.after}: {how}"),
                 ("  client's longest wait for a reply", f"{v.outage_s:.2f} s (site b took it over "
                                                         f"{v.detection_s:.2f} s after the loss)"),
                 ("  acknowledged records lost", f"{lost} of {v.acknowledged}"),
                 ("  most copies running at once", str(v.max_copies)),
                 ("  protected again after site a returned", f"{v.reprotect_s:.0f} s")]
    return rows


def _dr_rows(story: DrStory) -> list[tuple[str, str]]:
    good = story.lost_before_cut == 0
    return [("WAN link to the DR pool", f"{story.wan_rtt_ms:g} ms round trip, {story.wan_rate_mbit:g} Mbit/s; "
                                        f"RPO {story.rpo_s:g} s ({story.points_before_loss} points before the loss)"),
            ("failed over to", f"point {story.point}, cut {story.point_age_at_loss_s:.1f} s before the loss"),
            ("what `dr failover` said", story.loss_statement),
            ("acknowledged records lost", f"{story.lost} of {story.acknowledged}: "
             + ("[green]every one acknowledged after the cut[/]" if good
                else f"[red]{story.lost_before_cut} acknowledged before it[/]")
             + (f" ({story.kept_after_cut} acknowledged just after it are in it: written before)"
                if story.kept_after_cut else "")),
            ("running at the DR pool", f"{story.running_at_dr_s:.0f} s after the loss (it waits "
                                       f"{story.dr_confirm_s + 10:g} s of silence: dr_confirm + 10 s), answering "
                                       f"after {story.first_reply_s:.0f} s, on the same address"),
            ("level 2 at the DR pool", f"{story.protected_at_dr_s:.0f} s after the loss (raised online, "
                                       "mirrored to the DR pool's other host)"),
            ("main site back", "[green]asked its DR site, heard 'failed over', did not start it[/]"
             if story.old_site_fenced else "[red]not fenced[/]"),
            ("most copies running at once", str(story.max_copies))]


def _summary_rows(story: Result) -> list[tuple[str, str]]:
    if isinstance(story, SplitSiteStory):
        return _splitsite_rows(story)
    if isinstance(story, DrStory):
        return _dr_rows(story)
    r = story.level3 if isinstance(story, Level3Story) else story
    lost = f"[{'green' if r.lost == 0 else 'red'}]{r.lost}[/]"
    copies = f"{r.max_copies} ({r.copy_samples} samples of /proc)"
    if isinstance(story, Level3Story):
        r3 = story.level3
        kept = "[green]yes[/]" if r3.connection_kept else f"[red]no[/] ({r3.connections} connections)"
        return [("VM carried on (power loss)", f"{r3.failed_host} -> {r3.new_host}"),
                ("pause seen by the client", f"{r3.pause_s:.2f} s (next reply {r3.reply_after_loss_s:.2f} s "
                                             "after the power loss)"),
                ("takeover (power loss -> partner took over)", f"{r3.takeover_s:.2f} s"),
                ("client's TCP connection kept", kept),
                ("acknowledged records checked", str(r3.acknowledged)),
                ("acknowledged records lost", lost),
                ("gaps / repeats in the sequence", f"{r3.seq_gaps} / {r3.seq_repeats}"),
                ("guest console after failover", "clean" if not r3.guest_problems else
                 f"[red]{len(r3.guest_problems)} oops/panic lines[/]"),
                ("protected again after the host returned", f"{story.reprotect_s:.1f} s"),
                ("Level 1 VM beside it", f"outage {story.level1_outage_s:.2f} s, client reconnected "
                                         f"({story.level1_connections} connections): rebooted, state lost"),
                ("most copies running at once", copies)]
    if isinstance(r, Level2Result):
        return [("local disk failure", f"masked: longest wait for an answer {r.disk_failure_stall_s:.2f} s"),
                ("VM moved (power loss)", f"{r.failed_host} -> {r.new_host}"),
                ("outage seen by the client", f"{r.outage_s:.2f} s"),
                ("detection / restart", f"{r.detection_s:.2f} s / {r.restart_s:.2f} s"),
                ("acknowledged records checked", str(r.acknowledged)),
                ("acknowledged records lost", lost),
                ("resync of the returning host", f"{r.resync_bytes / 2**20:.1f} MiB in {r.resync_s:.1f} s"),
                ("most copies running at once", copies)]
    assert isinstance(r, FailoverResult)
    return [("VM moved", f"{r.failed_host} -> {r.new_host}"),
            ("outage seen by the client", f"{r.outage_s:.2f} s"),
            ("detection (power loss -> claim)", f"{r.detection_s:.2f} s (lease TTL {r.lease_ttl_s:g} s)"),
            ("restart (claim -> first answer)", f"{r.restart_s:.2f} s"),
            ("acknowledged records checked", str(r.acknowledged)),
            ("acknowledged records lost", lost),
            ("most copies running at once", copies)]


def _summary_table(r: Result) -> Table:
    t = Table(title="Summary", title_justify="left", show_header=False)
    for k, v in _summary_rows(r):
        t.add_row(k, v)
    return t


def cmd_demo(args: Any) -> int:
    try:
        ensure_root()
        image = build_guest(log=lambda m: None if is_json(args) else console.print(m))
    except (ScenarioError, GuestBuildError) as e:
        raise CliError(str(e), BAD_INPUT) from None
    lab_dir = Path(args.lab_dir) if args.lab_dir else labmod.DEFAULT_DIR
    if labmod.existing_namespaces() or (lab_dir / "lab.json").exists():
        raise CliError("a lab is already up: the demo builds its own; run `ftvm lab down` first", BAD_INPUT)
    rtt, rate = _metro_args(args)
    if args.dr and args.splitsite:
        raise CliError("--dr and --splitsite are separate demos", BAD_INPUT)
    view = LiveView(None, DR_TITLE if args.dr else SPLITSITE_TITLE if args.splitsite else TITLES[args.level])
    poller = threading.Thread(target=view.poll, daemon=True)
    result: Result | None = None
    try:
        with Live(view.render(), console=console, refresh_per_second=4, transient=False,
                  get_renderable=view.render) if not is_json(args) else _NullLive():
            view.step("bringing up a lab pool: 2 hosts, a LAN, a client, a quorum site (etcd)"
                      + (": h1 at site a, h2 at site b" if args.splitsite else "")
                      + ("; and a DR pool behind a WAN link" if args.dr else ""))
            timing = (Timing(partner_replace_after=labmod.LAB_PARTNER_REPLACE_AFTER, dr_confirm=DEMO_DR_CONFIRM_S)
                      if args.dr else None)
            state = labmod.up(2, lab_dir, probe_kernel=str(image.kernel), sites=2 if args.splitsite else 0,
                              dr=args.dr, timing=timing)
            view.pool = LabPool(state)
            poller.start()
            view.step(f"hosts {', '.join(state.hosts)} joined; quorum at {state.etcd_endpoint}")
            if args.dr:
                result = dr_story(view.pool, image, progress=view.step)
                time.sleep(1.0)
            elif args.splitsite:
                result = splitsite_story(view.pool, image, progress=view.step, rtt_ms=rtt, rate_mbit=rate)
                time.sleep(1.0)
            elif args.level == 3:
                result = level3_story(view.pool, image, progress=view.step)
                time.sleep(1.0)
            elif args.level == 2:
                result = level2_story(view.pool, image, progress=view.step)
                time.sleep(1.0)
            else:
                result = level1_failover(view.pool, image, progress=view.step)
                view.step(f"restoring {result.failed_host}")
                labmod.restore_host(state, result.failed_host)
                labmod.wait_for_hosts(state, state.hosts, 30)
                time.sleep(1.0)
    except (ScenarioError, labmod.LabError) as e:
        raise CliError(f"demo failed: {e} (lab left up for inspection: `ftvm lab down` removes it)",
                       FAILED) from None
    except Exception as e:  # noqa: BLE001 - anything else (a QMP error, ...) is a failed demo too
        log.exception("demo failed")
        raise CliError(f"demo failed: {type(e).__name__}: {e} (lab left up for inspection: "
                       "`ftvm lab down` removes it)", FAILED) from None
    finally:
        view.stop()
        if result is not None and not args.keep:
            labmod.down(lab_dir)
    assert result is not None
    if isinstance(result, (SplitSiteStory, DrStory)):
        if is_json(args):
            emit_json({"demo": "dr" if isinstance(result, DrStory) else "splitsite"} | result.to_json())
        else:
            console.print()
            console.print(_summary_table(result))
        return OK if result.ok else FAILED
    if is_json(args):
        emit_json({"level": args.level} | {k: v for k, v in result.to_json().items() if k != "events"})
    else:
        console.print()
        console.print(_summary_table(result))
        if args.keep:
            console.print("lab left up (--keep): try `ftvm status`, `ftvm events`; `ftvm lab down` ends it")
    r = result.level3 if isinstance(result, Level3Story) else result
    ok = r.lost == 0 and r.max_copies <= 1
    if isinstance(result, Level3Story):
        ok = ok and result.level3.connection_kept and not result.level3.guest_problems
    return OK if ok else FAILED


def _metro_args(args: Any) -> tuple[float, float]:
    from ..cli.lab_cmds import parse_rate_mbit, parse_rtt_ms
    if not args.splitsite:
        if args.rtt != "2ms" or args.rate != "0":
            raise CliError("--rtt and --rate go with --splitsite", BAD_INPUT)
        return 0.0, 0.0
    return parse_rtt_ms(args.rtt), parse_rate_mbit(args.rate)


class _NullLive:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
