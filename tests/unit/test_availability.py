"""Availability reports from history records (pure)."""

from __future__ import annotations

import pytest

from ftvm.core.availability import HistoryRecord as R
from ftvm.core.availability import report

DAY = 86400.0


def test_failover_outage_counts_planned_stop_does_not() -> None:
    recs = [R(0, "up", "h1"), R(1000, "down", "h1", "host h1 lost"), R(1008, "up", "h2"),
            R(5000, "stopped", "h2"), R(6000, "up", "h2")]
    r = report("web", recs, 0, 10_000, sla_target=99.9)
    assert r.unplanned_down_s == pytest.approx(8) and r.planned_down_s == pytest.approx(1000)
    assert r.availability == pytest.approx(1 - 8 / 9000)
    assert r.failovers == 1 and r.meets_sla is True
    (o,) = r.outages
    assert (o.start, o.end, o.cause, o.host_before, o.host_after) == (1000, 1008, "host h1 lost", "h1", "h2")
    j = r.to_json()
    assert j["time_to_recover_max_s"] == 8 and j["outages"][0]["failover"] is True


def test_restart_on_the_same_host_is_an_outage_but_not_a_failover() -> None:
    recs = [R(0, "up", "h1"), R(100, "down", "h1", "QEMU exited unasked"), R(104, "up", "h1")]
    r = report("web", recs, 0, 1000, sla_target=99.99)
    assert r.failovers == 0 and len(r.outages) == 1 and r.meets_sla is False
    assert r.availability == pytest.approx(0.996)


def test_period_clips_outages_and_an_open_outage_runs_to_the_end() -> None:
    recs = [R(-500, "up", "h1"), R(-10, "down", "h1", "lost"), R(20, "up", "h2"), R(900, "down", "h2", "lost")]
    r = report("web", recs, 0, 1000)
    assert [(o.start, o.end) for o in r.outages] == [(0, 20), (900, None)]
    assert r.unplanned_down_s == pytest.approx(120)
    assert r.availability == pytest.approx(1 - 120 / 1000) and r.meets_sla is None


def test_a_vm_never_meant_to_run_has_no_availability() -> None:
    assert report("idle", [], 0, DAY).availability is None
    r = report("off", [R(0, "up", "h1"), R(10, "stopped", "h1")], 100, DAY)
    assert r.availability is None and r.outages == []


def test_a_replaced_copy_dying_later_is_not_an_outage() -> None:
    """Level 3 takeover while the old primary still ran: it is killed after the VM is up on
    the partner; its own `down` must not open an outage."""
    recs = [R(0, "up", "h1"), R(100, "down", "h1", "h1 lost (silent 0.45s)"), R(100.8, "up", "h2"),
            R(103, "down", "h1", "self-fenced")]
    r = report("trade", recs, 0, 1000)
    assert [(o.start, o.end) for o in r.outages] == [(100, 100.8)]
    assert r.unplanned_down_s == pytest.approx(0.8)


def test_time_over_the_dr_rpo_counts_while_the_vm_runs() -> None:
    from ftvm.core.availability import HistoryRecord, report
    recs = [HistoryRecord(0, "up", "h1"), HistoryRecord(0, "dr-back", "h1"), HistoryRecord(100, "dr-over", "h1"),
            HistoryRecord(130, "dr-back", "h1"), HistoryRecord(500, "dr-over", "h1"),
            HistoryRecord(520, "down", "h1", "host h1 lost"),  # (down: not counted as over the RPO)
            HistoryRecord(560, "up", "h2"), HistoryRecord(560, "dr-back", "h2")]
    r = report("web", recs, 0, 1000)
    assert r.dr_over_rpo_s == 50 and r.up_s == 960 and r.unplanned_down_s == 40
    assert r.availability is not None and abs(r.availability - 0.96) < 1e-9  # (DR records change nothing else)
    r.dr = {"target": "far", "rpo_s": 30.0, "lag_s": 2.0, "within_rpo": True}
    assert r.to_json()["dr"]["rpo_met_percent"] == round(100 * (1 - 50 / 960), 3)
