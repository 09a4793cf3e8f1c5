"""Waiting on a QEMU migration: one poll of `query-migrate` for every use of it (live
migration out and in, the switch into a level 3 QEMU, a checkpoint's device state, the
device state a takeover loads), and the end of one from QEMU's MIGRATION event where a
monitor delivers events (a level 3 checkpoint: qemu/monitor.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .process import QemuError

FAILED_STATES = frozenset({"failed", "cancelled"})
ENDED = FAILED_STATES | {"completed"}  # a migration's last MIGRATION event status


class MigrationFailed(QemuError):
    """The migration failed, was cancelled, or did not reach the state in time."""

    def __init__(self, what: str, status: str, info: dict[str, Any]) -> None:
        desc = info.get("error-desc", "")
        super().__init__(f"{what} {status}" + (f": {desc}" if desc else ""))
        self.status, self.info = status, info


class Qmp(Protocol):
    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


async def wait_migration(qmp: Qmp, what: str, states: tuple[str, ...] = ("completed",),
                         timeout: float | None = None, poll: float = 0.01,
                         progress: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Poll until the migration's status is one of `states`; returns that `query-migrate`
    reply. `progress` sees every other reply. MigrationFailed if it failed or was cancelled,
    or (with `timeout`) took longer; `what` names it in the message."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = str(info.get("status", ""))
        if status in states:
            return dict(info)
        if status in FAILED_STATES:
            raise MigrationFailed(what, status, info)
        if deadline is not None and time.monotonic() > deadline:
            raise MigrationFailed(what, f"not done after {timeout:g} s ({status or 'no status'})", info)
        if progress is not None:
            await progress(info)
        await asyncio.sleep(poll)


async def migration_ended(qmp: Qmp, ended: Awaitable[dict[str, Any]], what: str, timeout: float) -> None:
    """Wait for `ended`, the data of the MIGRATION event whose status is in ENDED (expected
    before the `migrate` that causes it). MigrationFailed, with `query-migrate`'s reply,
    unless it completed."""
    status = str((await asyncio.wait_for(ended, timeout)).get("status"))
    if status != "completed":
        raise MigrationFailed(what, status, await qmp.execute("query-migrate"))
