"""Silence is counted only while this side's event loop could listen (l3/stalls.py)."""

from __future__ import annotations

import asyncio
import time

from ftvm.l3.stalls import LoopStalls


def test_a_stall_of_the_loop_is_not_counted_as_silence() -> None:
    async def go() -> None:
        stalls = LoopStalls()
        stalls.start()
        since = time.monotonic()
        await asyncio.sleep(0.05)
        assert stalls.unheard(since) < 0.03  # the loop ran: nothing forgiven
        time.sleep(0.2)  # the loop is held up, as by a fork or a burst of work
        # asked before the watcher woke (a stall under way): counted already
        assert 0.15 < stalls.unheard(since) <= time.monotonic() - since
        await asyncio.sleep(0.05)  # the watcher woke and recorded it
        assert 0.15 < stalls.unheard(since) < 0.25
        assert stalls.unheard(time.monotonic()) < 0.01  # a span after the stall owes it nothing
        stalls.stop()
    asyncio.run(go())


def test_without_a_watcher_on_this_loop_nothing_is_forgiven() -> None:
    stalls = LoopStalls()

    async def first() -> None:
        stalls.start()
        await asyncio.sleep(0.02)
    asyncio.run(first())  # that loop is gone: its watcher says nothing about the next one

    async def second() -> None:
        since = time.monotonic()
        time.sleep(0.1)
        assert stalls.unheard(since) == 0.0
        stalls.start()  # a watcher for this loop
        assert stalls.unheard(since) == 0.0  # (it starts afresh)
        stalls.stop()
    asyncio.run(second())
