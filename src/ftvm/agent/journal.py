"""The agent's journal: events (what happened, for operators) and availability history
(a VM's service up/down/stopped, for reports), queued here and written to etcd by the
reconcile loop, in order, when it can (an unreachable etcd delays them; nothing is
dropped below the queues' bounds). Also the reports of unreadable records and of errors
in the agent's loops, both rate-limited."""

from __future__ import annotations

import logging
import time
from collections import deque

from ..api.metrics import AgentCounters
from ..core.availability import HistoryRecord
from ..core.model import PoolSnapshot
from ..store.etcd import EtcdError
from ..store.pool import Event, PoolStore

log = logging.getLogger("ftvm.agent")

LOOP_ERROR_QUIET_S = 60.0  # at most one event per loop this often


class Journal:
    def __init__(self, host: str, store: PoolStore, counters: AgentCounters) -> None:
        self.host, self.store, self.counters = host, store, counters
        self._events: deque[Event] = deque(maxlen=1000)
        self._history: deque[tuple[str, HistoryRecord]] = deque(maxlen=10_000)
        self._loop_error_quiet: dict[str, float] = {}  # loop -> no new event before (monotonic)
        self._bad_seen: set[tuple[str, int]] = set()   # unreadable records already reported

    def event(self, vm: str, kind: str, message: str, at: float | None = None) -> None:
        ev = Event(time=at or time.time(), host=self.host, vm=vm, kind=kind, message=message)
        log.info("event %s", ev)
        self._events.append(ev)

    def history(self, vm: str, kind: str, cause: str = "", at: float | None = None, host: str | None = None) -> None:
        """A VM's service went up/down/stopped on `host` (default: here), for availability reports."""
        self._history.append((vm, HistoryRecord(at or time.time(), kind, host or self.host, cause)))

    async def flush(self) -> None:
        """Write what is queued, oldest first; stops at the first etcd error (next tick retries)."""
        while self._history:
            vm, rec = self._history[0]
            try:
                await self.store.add_history(vm, rec)
            except EtcdError:
                return
            self._history.popleft()
        while self._events:
            try:
                await self.store.add_event(self._events[0])
            except EtcdError:
                return
            self._events.popleft()

    def loop_error(self, loop: str, e: Exception) -> None:
        """An unexpected error in one of the agent's loops: logged in full, an event at most
        once a minute per loop, and the loop carries on."""
        self.counters.loop_errors += 1
        log.exception("%s loop: unexpected error (the loop carries on)", loop, exc_info=e)
        now = time.monotonic()
        if now >= self._loop_error_quiet.get(loop, 0.0):
            self._loop_error_quiet[loop] = now + LOOP_ERROR_QUIET_S
            self.event("", "agent-error", f"{loop} loop: {type(e).__name__}: {e} (it carries on; "
                                          "see the agent log)")

    def bad_records(self, snapshot: PoolSnapshot) -> None:
        """One event per unreadable value (key and revision), written by one host: the VM's
        owner if known, else the first live host by name."""
        for bad in snapshot.bad:
            if (bad.key, bad.revision) in self._bad_seen:
                continue
            self._bad_seen.add((bad.key, bad.revision))
            log.warning("unreadable record %s (revision %d): %s", bad.key, bad.revision, bad.reason)
            vm = bad.key[len(self.store.state) + len("vms/"):].split("/")[0] if "/vms/" in bad.key else ""
            frozen = snapshot.frozen.get(vm)
            view = snapshot.vms.get(vm)
            owner = view.owner.host if view is not None and view.owner is not None else None
            reporter = owner or min(snapshot.hosts, default=self.host)
            if reporter == self.host:
                what = f"{frozen.reason}; nothing is done to this VM until the record is fixed" if frozen \
                    else f"record {bad.key} unreadable, read as absent: {bad.reason}"
                self.event(vm if frozen else "", "bad-record", what)
