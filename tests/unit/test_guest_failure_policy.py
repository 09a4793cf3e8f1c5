"""Restarting a guest that failed on its own, and giving up (core/guest_failures.py)."""

from __future__ import annotations

import pytest

from ftvm.core.guest_failures import PANIC, WATCHDOG, GuestFailure, GuestPolicy, GuestRecord, on_guest_failure
from ftvm.core.records import RecordError

POLICY = GuestPolicy(max_restarts=3, window_s=3600)


def test_failures_are_restarted_up_to_the_limit_within_the_window_then_the_vm_stays_stopped() -> None:
    record = None
    for i, t in enumerate((0.0, 600.0, 1200.0)):
        v = on_guest_failure(record, GuestFailure(t, PANIC, "h1"), POLICY)
        assert v.restart and len(v.record.failures) == i + 1 and v.record.gave_up == ""
        assert f"{i + 1} of 3 restarts in 1 h" in v.reason
        record = v.record
    v = on_guest_failure(record, GuestFailure(1800.0, WATCHDOG, "h2"), POLICY)
    assert not v.restart and "guest failed 4 times in 1 h" in v.record.gave_up and "watchdog on h2" in v.reason


def test_failures_older_than_the_window_no_longer_count() -> None:
    record = GuestRecord((GuestFailure(0.0, PANIC, "h1"), GuestFailure(100.0, PANIC, "h1"),
                          GuestFailure(200.0, PANIC, "h1")))
    v = on_guest_failure(record, GuestFailure(3700.0, PANIC, "h1"), POLICY)
    assert v.restart and [f.at for f in v.record.failures] == [200.0, 3700.0]


def test_a_limit_of_zero_never_restarts() -> None:
    v = on_guest_failure(None, GuestFailure(5.0, PANIC, "h1"), GuestPolicy(max_restarts=0, window_s=60))
    assert not v.restart and "1 times in 1 min" in v.record.gave_up


def test_the_record_round_trips_and_a_bad_one_is_refused() -> None:
    record = on_guest_failure(None, GuestFailure(1.5, "health probe: tcp:7000 refused", "h1"), POLICY).record
    assert GuestRecord.from_json(record.to_json()) == record
    for bad in ({"v": 1, "failures": "x"}, {"v": 1, "failures": [{"at": "now"}]}, {"v": 99},
                {"v": 1, "gave_up": 3}, [1], {"v": 1, "failures": [{"at": 1.0, "cause": "x", "host": "h"}] * 40}):
        with pytest.raises(RecordError):
            GuestRecord.from_json(bad)


def test_the_availability_report_counts_guest_failures_apart_from_failovers() -> None:
    from ftvm.core.availability import HistoryRecord, report
    records = [HistoryRecord(0.0, "up", "h1"), HistoryRecord(100.0, "down", "h1", PANIC),
               HistoryRecord(101.0, "up", "h1", "guest restarted"), HistoryRecord(200.0, "down", "h1", "host h1 lost"),
               HistoryRecord(205.0, "up", "h2")]
    r = report("web", records, 0.0, 1000.0)
    assert r.guest_failures == 1 and r.failovers == 1
    d = r.to_json()
    assert d["guest_failures"] == 1 and [o["guest"] for o in d["outages"]] == [True, False]
