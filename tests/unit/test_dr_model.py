"""The DR modeler (core/dr_model.py): lag from a write-rate trace and a link, checked
against what can be worked out by hand."""

from __future__ import annotations

import pytest

from ftvm.core.dr_model import Link, ModelError, Shipping, Trace, bandwidth_for, parse_trace, simulate, svg

MB = 1_000_000


def test_an_idle_vm_lags_by_at_most_one_interval_and_half_a_round_trip() -> None:
    p = simulate(Trace(1.0, (0,) * 120), Link(10 * MB, rtt_s=0.04), Shipping(point_interval_s=10))
    assert 10.0 <= p.max_s <= 10.0 + 0.02 + 0.1  # (the series' step)
    assert 4.5 <= p.p50_s <= 5.5 and p.catch_ups == [] and p.bytes_sent == 0


def test_a_steady_load_the_link_carries_adds_one_point_s_transfer() -> None:
    # 1 MB/s written, compressed to half, over a 2 MB/s link: a 10 s point (5 MB) takes 2.5 s
    p = simulate(Trace(1.0, (MB,) * 300), Link(2 * MB), Shipping(10, compression=0.5))
    assert p.max_s == pytest.approx(12.5, abs=0.11)
    assert p.link_busy == pytest.approx(0.25, abs=0.01) and p.bytes_sent == 150 * MB


def test_a_burst_the_link_cannot_carry_is_lag_then_catch_up_worked_out_by_hand() -> None:
    # 150 MB in second 50, a 10 MB/s link, a point every 10 s: the point closed at 60 s carries
    # it and is usable at 75 s (so just before, the newest usable point is the one of 50 s); the
    # point closed at 70 s waits for the link until 75 s, then is usable at once: caught up
    written = [0] * 200
    written[50] = 150 * MB
    p = simulate(Trace(1.0, tuple(written)), Link(10 * MB), Shipping(10))
    assert p.max_s == pytest.approx(25.0, abs=0.11)
    assert p.catch_ups == [(60.0, pytest.approx(15.0, abs=0.01))]
    # twice the link: 7.5 s to send it, within the interval: no backlog
    faster = simulate(Trace(1.0, tuple(written)), Link(20 * MB), Shipping(10))
    assert faster.max_s == pytest.approx(17.5, abs=0.11) and faster.catch_ups == []


def test_the_bandwidth_for_an_rpo_meets_it_and_a_little_less_does_not() -> None:
    trace = Trace(1.0, tuple(40 * MB if 100 <= s < 130 else 2 * MB for s in range(600)))
    ship = Shipping(10, compression=0.5)
    need = bandwidth_for(trace, 0.04, ship, 30.0)
    assert simulate(trace, Link(need, 0.04), ship).p99_s <= 30.0
    assert simulate(trace, Link(need * 0.97, 0.04), ship).p99_s > 30.0
    with pytest.raises(ModelError, match="cannot be met"):
        bandwidth_for(trace, 0.04, ship, 5.0)  # below one interval


def test_a_trace_file_is_read_strictly() -> None:
    assert parse_trace("# from ftvm\n0,100\n1,200\n2,300\n") == Trace(1.0, (100, 200, 300))
    assert parse_trace("5\n6\n") == Trace(1.0, (5, 6))
    assert parse_trace("0,1\n0.5,2\n1.0,3\n").interval_s == 0.5
    for bad, why in (("", "empty"), ("0,1\n1,2,3\n", "line 2"), ("0,x\n", "line 1"), ("0,1\n2\n", "every"),
                     ("0,1\n1,2\n5,3\n", "evenly")):
        with pytest.raises(ModelError, match=why):
            parse_trace(bad)
    with pytest.raises(ModelError, match="negative"):
        simulate(Trace(1.0, (-1,)), Link(MB), Shipping())
    with pytest.raises(ModelError, match="rate"):
        simulate(Trace(1.0, (1,)), Link(0), Shipping())


def test_the_plot_is_an_svg_with_the_predicted_and_measured_lag_and_the_target() -> None:
    p = simulate(Trace(1.0, (MB,) * 60), Link(2 * MB), Shipping(10))
    out = svg(p, "lag <test>", rpo_s=30, measured=[(0.0, 1.0), (60.0, 11.0)])
    assert out.startswith("<svg") and out.count("<polyline") == 2 and "RPO target 30 s" in out
    assert "lag &lt;test&gt;" in out


def test_points_go_one_at_a_time_as_the_agent_ships_them() -> None:
    # 150 MB at 50 s, 10 MB/s, RTT 0.2 s: the point cut at 60 s takes 15 s; the next is cut
    # when its commit is answered (75.2 s), not queued from 70 s: at 80 s the lag is 4.8 s
    written = [0] * 200
    written[50] = 150 * MB
    p = simulate(Trace(1.0, tuple(written)), Link(10 * MB, rtt_s=0.2), Shipping(10))
    lag = dict(p.lag)
    assert lag[74.9] == pytest.approx(24.9, abs=0.01)   # the newest usable is still the cut of 50 s
    assert lag[76.0] == pytest.approx(0.8, abs=0.01)    # the point cut at 75.2 s, usable at 75.3 s
    assert lag[80.0] == pytest.approx(4.8, abs=0.01)
    assert p.bytes_sent == 150 * MB
