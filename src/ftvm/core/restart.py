"""When a VM that failed on this host is tried again here (pure).

A start that fails, or a QEMU that dies young, backs off exponentially (0.5 s, 1 s, 2 s,
... up to 30 s), so a VM that cannot run does not spin; a run of 30 s or more counts as
healthy and resets the count. A level 3 VM whose partner holds its last checkpoint waits
longer than the partner's takeover time, so that the partner carries on with the guest's
state rather than this host rebooting the guest from its disk.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 30.0     # a run this long resets the failure count
TAKEOVER_SLACK_S = 1.0   # on top of the partner's takeover time


@dataclass(frozen=True)
class Retry:
    failures: int    # consecutive failed starts or young deaths
    at: float        # monotonic time before which no new start is tried


def backoff(failures: int, now: float) -> Retry:
    """One more failure after `failures`: when to try again."""
    return Retry(failures + 1, now + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** failures))


def after_exit(failures: int, ran_for: float, now: float, partner_takes_over_after: float | None = None) -> Retry:
    """QEMU ended unasked after running `ran_for` seconds. `partner_takes_over_after`: a
    level 3 partner holds the guest's last checkpoint and takes over after this long."""
    retry = backoff(failures, now) if ran_for < HEALTHY_RUN_S else Retry(0, now)
    if partner_takes_over_after is not None:
        retry = Retry(retry.failures, max(retry.at, now + partner_takes_over_after + TAKEOVER_SLACK_S))
    return retry
