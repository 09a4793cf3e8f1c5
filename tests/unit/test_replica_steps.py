"""The level 2 replica manager's next step (core/replica_steps.py), one row per case."""

from __future__ import annotations

import pytest

from ftvm.core.model import Export
from ftvm.core.replica_steps import Step, next_step
from ftvm.core.replication import CopyState, mark, new_copies

EXPORT = Export("h2", "10.79.0.2", 10809)
FRESH = Export("h2", "10.79.0.2", 10809, fresh=True)


def copies(h1: CopyState = CopyState.CURRENT, h2: CopyState = CopyState.CURRENT):  # type: ignore[no-untyped-def]
    c = new_copies("h1", "h2", 0.0)
    return mark(mark(c, "h1", h1, "x", 1.0), "h2", h2, "x", 1.0)


@pytest.mark.parametrize("case, args, step, extra", [
    ("the guest stopped on an I/O error", ("io-error", "mirrored", False, copies(), (EXPORT,)),
     Step.IO_ERROR, {}),
    ("a copy drop left half done", ("paused", "local-only", True, copies(), (EXPORT,)), Step.FINISH_DROP, {}),
    ("paused without a pending drop: mirrored as usual", ("paused", "mirrored", False, copies(), (EXPORT,)),
     Step.WATCH_PARTNER, {"mark_current": False}),
    ("mirrored and recorded current", ("running", "mirrored", False, copies(), (EXPORT,)),
     Step.WATCH_PARTNER, {"mark_current": False, "partner": "h2"}),
    ("mirrored, the record still says syncing", ("running", "mirrored", False, copies(h2=CopyState.SYNCING),
                                                 (EXPORT,)), Step.WATCH_PARTNER, {"mark_current": True}),
    ("mirrored, the partner's export gone", ("running", "mirrored", False, copies(), ()),
     Step.WATCH_PARTNER, {"export": None}),
    ("local only, partner behind: its changed blocks", ("running", "local-only", False,
                                                        copies(h2=CopyState.OUTDATED), (EXPORT,)),
     Step.RESYNC_PARTNER, {"full": False}),
    ("local only, partner's copy is new and empty: all of it", ("running", "local-only", False,
                                                                copies(h2=CopyState.OUTDATED), (FRESH,)),
     Step.RESYNC_PARTNER, {"full": True}),
    ("local only, partner not exporting", ("running", "local-only", False, copies(h2=CopyState.OUTDATED), ()),
     Step.NOTHING, {}),
    ("local only, guest paused", ("paused", "local-only", False, copies(h2=CopyState.OUTDATED), (EXPORT,)),
     Step.NOTHING, {}),
    ("on the partner's copy, local disk replaced", ("running", "remote-only", False,
                                                    copies(h1=CopyState.FAILED), (EXPORT,)), Step.RECORD_REPAIR, {}),
    ("on the partner's copy, local disk still failed", ("running", "remote-only", False,
                                                        copies(h1=CopyState.FAILED), (EXPORT,)), Step.NOTHING,
     {"repair": False}),
    ("on the partner's copy, local copy behind", ("running", "remote-only", False, copies(h1=CopyState.OUTDATED),
                                                  (EXPORT,)), Step.RESYNC_LOCAL, {}),
    ("no copies record", ("running", "local-only", False, None, (EXPORT,)), Step.NOTHING, {}),
])
def test_next_step(case: str, args: tuple, step: Step, extra: dict) -> None:  # type: ignore[type-arg]
    repair = extra.pop("repair", True if step is Step.RECORD_REPAIR else False)
    got = next_step(*args, me="h1", repair_requested=repair)
    assert got.step is step, (case, got)
    for field, want in extra.items():
        assert getattr(got, field) == want, (case, field, got)
