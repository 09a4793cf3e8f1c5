"""How long this process's event loop could not run: silence from a level 3 peer is counted
only while this side could listen.

Both ends of a checkpoint link judge the other by its silence (the partner takes over after
`l3_takeover_after`, the primary gives up on its partner after `l3_partner_lost`). A side
whose own event loop was held up (a fork, a burst of work on a loaded host) reads what the
peer sent meanwhile only once it runs again, and would blame the peer for its own stall:
seen in the lab as a takeover of a healthy primary, the partner's loop having stalled for a
few hundred milliseconds while it started a QEMU. So a watcher task beats every `TICK` and
records the times it woke late; `unheard(since, now)` is how much of that span the loop
was stalled, a stall still under way (the watcher has not run yet) included. Forgiving
it delays a takeover or a lost-partner verdict by at most the stall, never makes one
happen: safety still rests on the etcd transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

TICK = 0.01     # the watcher's beat
LATE = 0.02     # a wake-up later than this (beyond the beat) is a stall


class LoopStalls:
    def __init__(self) -> None:
        self._beat = time.monotonic()
        self._stalls: deque[tuple[float, float]] = deque(maxlen=4096)  # (from, to), in order
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Begin watching the running event loop (idempotent; a new loop, as in tests that
        run several one after the other, gets a new watcher)."""
        loop = asyncio.get_running_loop()
        if not self._watching(loop):
            self._beat, self._loop = time.monotonic(), loop
            self._stalls.clear()
            self._task = loop.create_task(self._watch(), name="loop-stalls")

    def _watching(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        return self._task is not None and not self._task.done() and self._loop is loop

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.beat(time.monotonic())

    def beat(self, now: float) -> None:
        due = self._beat + TICK
        if now - due > LATE:
            self._stalls.append((due, now))
        self._beat = now

    def unheard(self, since: float, now: float | None = None) -> float:
        """Seconds between `since` and `now` during which this loop was stalled."""
        now = time.monotonic() if now is None else now
        try:
            watching = self._watching(asyncio.get_running_loop())
        except RuntimeError:  # (no loop: nothing watched)
            watching = False
        if not watching:
            return 0.0
        total = 0.0
        for start, end in reversed(self._stalls):
            if end <= since:
                break
            total += max(0.0, min(end, now) - max(start, since))
        due = self._beat + TICK
        if now - due > LATE:  # a stall the watcher has not woken from yet
            total += max(0.0, now - max(due, since))
        return total

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


STALLS = LoopStalls()  # one per agent process (its one event loop); started by the first user
