"""Sites (SplitSite): partners at the other site, and status when a VM's protection does not
survive its site's loss (core/sites.py, core/placement.py, core/protection.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ftvm.agent.config import ConfigError, load_config
from ftvm.core.model import (Desired, DiskSpec, Export, HostInfo, Level, NicSpec, Ownership, PoolSnapshot,
                             RunState, VmSpec, VmStatus, VmView)
from ftvm.core.placement import choose_partner
from ftvm.core.protection import protection
from ftvm.core.records import RecordError
from ftvm.core.replication import CopyState, mark, new_copies


def hosts(**site_of: str) -> dict[str, HostInfo]:
    return {n: HostInfo(n, 4096, 8, ("/s",), replication_addr=f"10.79.0.{i}", site=s)
            for i, (n, s) in enumerate(sorted(site_of.items()), 1)}


def l2(name: str, host: str, partner: str) -> VmView:
    spec = VmSpec(name, Level.COMPONENT, 512, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:01"),),
                  desired=Desired.RUNNING)
    copies = mark(new_copies(host, partner, 1.0), partner, CopyState.CURRENT, "in sync", 2.0)
    return VmView(spec, Ownership(host, 1), status=VmStatus(host, RunState.RUNNING, 1, 0.0), copies=copies,
                  exports=(Export(partner, "10.79.0.9", 10809),))


def test_the_partner_goes_to_the_other_site_even_when_a_host_there_is_busier() -> None:
    hs = hosts(h1="a", h2="a", h3="b", h4="b")
    # h3 and h4 already back two VMs each; h2 none: without sites h2 would be chosen
    vms = {f"v{i}": l2(f"v{i}", "h1", p) for i, p in enumerate(("h3", "h3", "h4", "h4"))}
    snap = PoolSnapshot(1, hs, vms)
    assert choose_partner(snap, vms["v0"].spec, "h1") in ("h3", "h4")
    no_sites = PoolSnapshot(1, {n: replace(h, site="") for n, h in hs.items()}, vms)
    assert choose_partner(no_sites, vms["v0"].spec, "h1") == "h2"
    # a host at the other site without room comes after one with room at the same site
    full = {n: (replace(h, memory_mib=600) if h.site == "b" else h) for n, h in hs.items()}
    assert choose_partner(PoolSnapshot(1, full, vms), vms["v0"].spec, "h1") == "h2"


def test_status_says_when_protection_does_not_survive_the_site_and_why() -> None:
    hs = hosts(h1="a", h2="a", h3="b")
    across = protection(PoolSnapshot(1, hs, {"x": l2("x", "h1", "h3")}), l2("x", "h1", "h3"))
    assert across.protected and across.site_caveat == "" and str(across) == "Protected"
    view = l2("x", "h1", "h2")
    same = protection(PoolSnapshot(1, hs, {"x": view}), view)
    assert same.protected and "does not survive the loss of site a: its partner h2 is there too" in str(same)
    assert "no host at another site (h3) had room" in same.site_caveat
    alone = {n: h for n, h in hs.items() if n != "h3"}  # site b down: no caveat (fewer than 2 sites)
    assert protection(PoolSnapshot(1, alone, {"x": view}), view).site_caveat == ""


def test_a_level_1_vm_needs_a_host_at_another_site_to_restart_it() -> None:
    spec = VmSpec("w", Level.RESTART, 512, 1, (DiskSpec("/s/w.img"),), (NicSpec("52:54:00:00:00:02"),),
                  desired=Desired.RUNNING)
    view = VmView(spec, Ownership("h1", 1), status=VmStatus("h1", RunState.RUNNING, 1, 0.0))
    hs = hosts(h1="a", h2="a", h3="b")
    assert protection(PoolSnapshot(1, hs, {"w": view}), view).site_caveat == ""
    hs["h3"] = replace(hs["h3"], shared_storage=())  # site b cannot reach the VM's disk
    caveat = protection(PoolSnapshot(1, hs, {"w": view}), view).site_caveat
    assert "does not survive the loss of site a: no host at another site can restart it" in caveat


def test_a_site_is_a_name_in_host_toml_and_in_the_host_record(tmp_path: Path) -> None:
    base = (f'name = "h1"\npool = "p"\netcd = ["http://127.0.0.1:2379"]\nstate_dir = "{tmp_path}"\n'
            'bridge = "br0"\nmemory_mib = 1024\nvcpus = 2\nshared_storage = []\n')
    cfg = tmp_path / "host.toml"
    cfg.write_text(base + 'site = "north"\n')
    assert load_config(cfg).site == "north"
    cfg.write_text(base)
    assert load_config(cfg).site == ""
    cfg.write_text(base + 'site = "North Site"\n')
    with pytest.raises(ConfigError, match="site"):
        load_config(cfg)
    with pytest.raises(RecordError, match="site"):
        HostInfo.from_json(HostInfo("h1", 1, 1, site="a").to_json() | {"site": "../x"})


def test_metro_link_settings_parse_and_bad_ones_are_refused() -> None:
    from ftvm.cli.lab_cmds import parse_rate_mbit, parse_rtt_ms
    from ftvm.errors import FtvmError
    assert parse_rtt_ms("10ms") == 10.0 and parse_rtt_ms("0.5s") == 500.0 and parse_rtt_ms("250us") == 0.25
    assert parse_rtt_ms("7") == 7.0
    assert parse_rate_mbit("150mbit") == 150.0 and parse_rate_mbit("1gbit") == 1000.0
    assert parse_rate_mbit("0") == 0.0 and parse_rate_mbit("500kbit") == 0.5
    for bad in ("fast", "10 parsecs"):
        with pytest.raises(FtvmError):
            parse_rtt_ms(bad)
        with pytest.raises(FtvmError):
            parse_rate_mbit(bad)


# --- the preferred site: who keeps a VM when the sites lose each other ----------------

from ftvm.core.decide import Action, choose_host, decide  # noqa: E402
from ftvm.core.model import LocalStandby, LocalView, LocalVm  # noqa: E402
from ftvm.core.sites import renewed_since, takeover_delay, yields_in_cut  # noqa: E402


def preferring(view: VmView, site: str, level: Level = Level.COMPONENT) -> VmView:
    return replace(view, spec=replace(view.spec, site=site, level=level))


def test_only_the_primary_away_from_the_preferred_site_yields_to_a_live_partner_there() -> None:
    hs = hosts(h1="a", h2="a", h3="b")
    view = preferring(l2("x", "h1", "h3"), "b")
    snap = PoolSnapshot(1, hs, {"x": view})
    assert "site b, the VM's preferred site, keeps it" in (yields_in_cut(snap, view, "h1") or "")
    at_home = preferring(l2("x", "h1", "h3"), "a")  # the primary stands at the preferred site
    assert yields_in_cut(PoolSnapshot(1, hs, {"x": at_home}), at_home, "h1") is None
    none = l2("x", "h1", "h3")  # no preference: the side running it keeps it
    assert yields_in_cut(PoolSnapshot(1, hs, {"x": none}), none, "h1") is None
    gone = {n: h for n, h in hs.items() if n != "h3"}  # the partner's lease expired: its site is lost
    assert yields_in_cut(PoolSnapshot(1, gone, {"x": view}), view, "h1") is None
    behind = replace(view, copies=mark(view.copies, "h3", CopyState.OUTDATED, "lost", 3.0))
    assert yields_in_cut(PoolSnapshot(1, hs, {"x": behind}), behind, "h1") is None  # never to a stale copy
    withdrawn = replace(view, exports=())  # the partner stopped serving its copy itself: not a cut
    assert yields_in_cut(PoolSnapshot(1, hs, {"x": withdrawn}), withdrawn, "h1") is None
    same_site = preferring(l2("x", "h1", "h2"), "a")
    assert yields_in_cut(PoolSnapshot(1, hs, {"x": same_site}), same_site, "h1") is None


def test_a_yielded_vm_is_released_and_restarted_at_its_preferred_site_not_here() -> None:
    hs = hosts(h1="a", h2="a", h3="b")
    view = preferring(l2("x", "h1", "h3"), "b")
    snap = PoolSnapshot(1, hs, {"x": view})
    stopped = LocalView("h1", {"x": LocalVm("x", RunState.STOPPED, 1, 0, yielded="cut")})
    d = decide(snap, stopped).decisions[0]
    assert d.action is Action.RELEASE and "cut" in d.reason
    released = PoolSnapshot(2, hs, {"x": replace(view, owner=None, status=None, home="h1")})
    assert choose_host(released, released.vms["x"])[0] == "h3"
    assert decide(released, LocalView("h1")).decisions[0].action is Action.WAIT
    assert decide(released, LocalView("h3")).decisions[0].action is Action.CLAIM
    # site b lost after all: h1's copy is as current as it was, so h1 starts it again
    lost_b = PoolSnapshot(3, {n: h for n, h in hs.items() if n != "h3"}, released.vms)
    assert choose_host(lost_b, lost_b.vms["x"])[0] == "h1"
    # without a preference the home host restarts it
    plain = PoolSnapshot(2, hs, {"x": replace(l2("x", "h1", "h3"), owner=None, status=None, home="h1")})
    assert choose_host(plain, plain.vms["x"])[0] == "h1"


def test_restarts_go_to_the_preferred_site_when_it_has_room() -> None:
    spec = VmSpec("w", Level.RESTART, 512, 1, (DiskSpec("/s/w.img"),), (NicSpec("52:54:00:00:00:02"),),
                  desired=Desired.RUNNING, site="b")
    hs = hosts(h1="a", h2="a", h3="b")
    first = PoolSnapshot(1, hs, {"w": VmView(spec)})
    assert choose_host(first, first.vms["w"])[0] == "h3"
    lost = PoolSnapshot(1, {n: h for n, h in hs.items() if n != "h3"}, {"w": VmView(spec, home="h3")})
    assert choose_host(lost, lost.vms["w"])[0] in ("h1", "h2")  # site b down: anywhere else


def test_a_partner_away_from_the_preferred_site_leaves_the_primary_the_first_word() -> None:
    hs = hosts(h1="a", h2="a", h3="b")
    view = preferring(l2("x", "h1", "h3"), "a", Level.SYSTEM)
    snap = PoolSnapshot(1, hs, {"x": view})
    assert takeover_delay(snap, view, "h3", 0.3) == 0.6
    local = LocalView("h3", standbys={"x": LocalStandby("x", 7, 0.45)})
    assert decide(snap, local, takeover_after=0.3).decisions[0].action is Action.WAIT
    late = LocalView("h3", standbys={"x": LocalStandby("x", 7, 0.65)})
    assert decide(snap, late, takeover_after=0.3).decisions[0].action is Action.TAKE_OVER
    # the primary's host gone (its lease ended): no reason to wait longer
    gone = PoolSnapshot(1, {n: h for n, h in hs.items() if n != "h1"}, {"x": view})
    assert takeover_delay(gone, view, "h3", 0.3) == 0.3
    toward = preferring(l2("x", "h1", "h3"), "b", Level.SYSTEM)  # the partner is at the preferred site
    assert takeover_delay(PoolSnapshot(1, hs, {"x": toward}), toward, "h3", 0.3) == 0.3


def test_a_lease_renewed_after_the_link_was_lost_proves_the_partner_reaches_the_witness() -> None:
    # granted 5 s, asked 4 s after the loss, keepalives every second (etcd rounds down)
    assert renewed_since(4, 5, 4.0) and renewed_since(3, 5, 4.0)
    assert not renewed_since(1, 5, 4.0)  # last renewed before the loss
    assert not renewed_since(0, 5, 4.0) and not renewed_since(-1, 5, 4.0)


def test_level_3_compresses_between_sites_unless_host_toml_says_otherwise(tmp_path: Path) -> None:
    from ftvm.core.sites import across_sites, compresses
    hs = hosts(h1="a", h2="a", h3="b")
    snap = PoolSnapshot(1, hs, {})
    assert across_sites(snap, "h1", "h3") and not across_sites(snap, "h1", "h2")
    assert compresses("between-sites", True) and not compresses("between-sites", False)
    assert compresses("always", False) and not compresses("never", True)
    base = (f'name = "h1"\npool = "p"\netcd = ["http://127.0.0.1:2379"]\nstate_dir = "{tmp_path}"\n'
            'bridge = "br0"\nmemory_mib = 1024\nvcpus = 2\nshared_storage = []\n')
    cfg = tmp_path / "host.toml"
    cfg.write_text(base)
    assert load_config(cfg).l3_compress == "between-sites"
    cfg.write_text(base + 'l3_compress = "never"\n')
    assert load_config(cfg).l3_compress == "never"
    cfg.write_text(base + 'l3_compress = "sometimes"\n')
    with pytest.raises(ConfigError, match="l3_compress"):
        load_config(cfg)
