"""How an agent process ends (agent/main.py): tasks still running after the agent's own
ending are cancelled, and one that swallows its cancellation is named, not waited on."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ftvm.agent.main import end_stray_tasks


async def _obedient() -> None:
    await asyncio.sleep(3600)


async def _stubborn() -> None:
    while True:  # the bug this guards against: a cancellation caught and dropped
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue


async def test_tasks_that_end_when_cancelled_are_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    tasks = [asyncio.create_task(_obedient()) for _ in range(3)]
    await asyncio.sleep(0)
    assert await end_stray_tasks(5.0) == []
    assert all(t.cancelled() for t in tasks)
    assert "did not end" not in caplog.text


async def test_a_task_that_swallows_its_cancellation_is_named_and_left(caplog: pytest.LogCaptureFixture) -> None:
    stubborn = asyncio.create_task(_stubborn(), name="stubborn-one")
    obedient = asyncio.create_task(_obedient())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        left = await end_stray_tasks(0.2)
    assert left == [stubborn] and obedient.cancelled()
    assert "stubborn-one did not end when cancelled" in caplog.text and "_stubborn" in caplog.text
    stubborn.get_coro().close()  # (the test's own clean-up: the agent's process just exits)
