"""Which recovery points the DR site keeps, and how the others are consolidated (pure)."""

from __future__ import annotations

from ftvm.core.dr_points import HOUR_S, PointInfo, Retention, consolidation, lag_s, to_keep


def test_every_point_for_an_hour_then_the_newest_of_each_hour_for_a_week() -> None:
    now = 10 * 24 * HOUR_S
    points = [PointInfo(n, now - (200 - n) * 600.0) for n in range(200)]  # one every 10 min
    keep = to_keep(points, now, Retention())
    recent = {p.number for p in points if now - p.taken_at <= HOUR_S}
    assert recent <= keep and len(recent) == 6  # ages 600 s to 3600 s
    hourly = keep - recent
    hours = {int(p.taken_at // HOUR_S) for p in points if p.number in hourly}
    assert len(hours) == len(hourly)  # one per hour
    assert all(now - points[n].taken_at <= 7 * 24 * HOUR_S for n in keep)
    # the newest of its hour: no kept hourly point has a later one in the same hour
    for n in hourly:
        same = [p for p in points if int(p.taken_at // HOUR_S) == int(points[n].taken_at // HOUR_S)]
        assert max(p.number for p in same) == n or any(p.number in recent for p in same)


def test_the_newest_point_is_always_kept_and_a_tested_one_within_the_week() -> None:
    points = [PointInfo(1, 0.0), PointInfo(2, 100.0, tested=True), PointInfo(3, 200.0)]
    keep = to_keep(points, 10 * 24 * HOUR_S, Retention())
    assert keep == {3}  # everything older than the week: only the newest stays
    keep = to_keep(points, 2 * HOUR_S, Retention())
    assert keep == {2, 3}  # 2 is tested, 3 the newest in that hour


def test_consolidation_folds_dropped_points_into_the_next_kept_one_newest_first() -> None:
    plan = consolidation([1, 2, 3, 4, 5, 6], {3, 6})
    assert plan.into_base == (1, 2)
    assert plan.merges == ((5, 6), (4, 6))
    assert consolidation([1, 2], set()).into_base == (1, 2)


def test_retention_settings_are_checked() -> None:
    assert Retention().problem() is None
    assert Retention(all_for_s=0).problem() is not None
    assert Retention(all_for_s=10 * HOUR_S, hourly_for_s=HOUR_S).problem() is not None


def test_lag_counts_from_the_newest_committed_point_or_from_the_start() -> None:
    assert lag_s(100.0, 130.0, 0.0) == 30.0
    assert lag_s(None, 130.0, 120.0) == 10.0


def test_dr_targets_and_dr_specs_are_checked_when_read() -> None:
    import pytest

    from ftvm.core.model import DrTarget, Level, VmSpec, dr_interval_s, spec_problem
    from ftvm.core.records import RecordError
    t = DrTarget("far", ("10.0.0.1:7420", "[fd00::1]:7420"))
    assert DrTarget.from_json(t.to_json()) == t
    for bad in ({"name": "far", "receivers": []}, {"name": "far", "receivers": ["host:7420"]},
                {"name": "far", "receivers": ["10.0.0.1:99999"]}, {"name": "Far!", "receivers": ["10.0.0.1:1"]},
                {"name": "far", "receivers": "10.0.0.1:1"}):
        with pytest.raises(RecordError):
            DrTarget.from_json(bad | {"v": 1})
    spec = VmSpec("web", Level.COMPONENT, 256, 1, (), (), dr_target="far", dr_rpo_s=10.0)
    assert spec_problem(spec) is None
    assert "RPO" in (spec_problem(VmSpec("web", Level.COMPONENT, 256, 1, (), (), dr_target="far",
                                         dr_rpo_s=1.0)) or "")
    assert dr_interval_s(10.0) == 10 / 3 and dr_interval_s(3600) == 60 and dr_interval_s(3) == 1


def test_a_dr_replica_record_round_trips_and_bad_ones_are_refused() -> None:
    import pytest

    from ftvm.core.model import DrPoint, DrReplica
    from ftvm.core.records import RecordError
    r = DrReplica("lab", "web", "h2", (DrPoint(1, 10.0), DrPoint(2, 12.5, tested=True)), (64 << 20,), 13.0)
    assert DrReplica.from_json(r.to_json()) == r
    for bad in ({"points": "x"}, {"host": "H 2"}, {"points": [{"number": "1", "taken_at": 1.0}]},
                {"points": [{"number": 1, "taken_at": 1.0}] * 10_001}):
        with pytest.raises(RecordError):
            DrReplica.from_json(r.to_json() | bad)


def test_a_failover_states_what_it_loses() -> None:
    from ftvm.core.model import DrContact, DrPoint, DrReplica
    from ftvm.core.dr_points import dr_loss
    points = (DrPoint(1, 1000.0, data_bytes=4096), DrPoint(2, 1010.0, data_bytes=3 << 20),
              DrPoint(3, 1020.0, data_bytes=65536))
    contact = DrContact(heard_at=1023.5, confirm_s=60, in_flight_bytes=131072, in_flight_taken_at=1023.0)
    replica = DrReplica("main", "web", "h9", points, (1 << 30,), contact=contact)
    newest = dr_loss(replica, 3, now=1100.0)
    assert "newer point" not in newest and "3.5 s or more" in newest
    assert "128 KiB of a point" in newest and "(76 s ago, " in newest
    older = dr_loss(replica, 1, now=1100.0)
    assert "23.5 s or more" in older and "2 newer point(s)" in older
    assert "20.0 s of writes, 3.1 MiB of changed blocks" in older
    # last heard at the newest point: nothing in flight to state
    quiet = dr_loss(DrReplica("main", "web", "h9", points, (1 << 30,), contact=DrContact(heard_at=1020.0)), 3, 1030.0)
    assert "0.0 s or more" in quiet and "(10 s ago)" in quiet and "arriving" not in quiet
