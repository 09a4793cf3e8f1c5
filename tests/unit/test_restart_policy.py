"""When a failed VM is tried again on the same host (core/restart.py)."""

from __future__ import annotations

import pytest

from ftvm.core.restart import BACKOFF_MAX_S, HEALTHY_RUN_S, Retry, after_exit, backoff


@pytest.mark.parametrize("failures, wait", [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, BACKOFF_MAX_S),
                                            (40, BACKOFF_MAX_S)])
def test_failed_starts_back_off_exponentially_up_to_a_limit(failures: int, wait: float) -> None:
    assert backoff(failures, 100.0) == Retry(failures + 1, 100.0 + wait)


@pytest.mark.parametrize("case, failures, ran_for, partner, expect", [
    ("died young: backs off", 2, 3.0, None, Retry(3, 102.0)),
    ("ran long: healthy, retried at once, count reset", 4, HEALTHY_RUN_S, None, Retry(0, 100.0)),
    ("level 3, partner holds the checkpoint: it gets the first go", 0, 60.0, 0.8, Retry(0, 101.8)),
    ("level 3, young and partner: the later of the two", 5, 1.0, 0.8, Retry(6, 116.0)),
])
def test_after_an_unasked_exit(case: str, failures: int, ran_for: float, partner: float | None,
                               expect: Retry) -> None:
    assert after_exit(failures, ran_for, 100.0, partner) == expect, case
