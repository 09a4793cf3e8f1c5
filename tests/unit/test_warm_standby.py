"""The level 3 partner's warm QEMUs (agent/warm.py), without QEMU: when one is started,
kept, handed to a start, or ended."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from ftvm.agent.warm import RESERVE_S, WarmQemu, WarmStandbys, machine_of
from ftvm.core.model import DiskSpec, Level, NicSpec, VmSpec
from ftvm.qemu.process import QemuError

SPEC = VmSpec("trade", Level.SYSTEM, 256, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:03"),))


class FakeProcess:
    """Stands in for a QemuVm: alive until killed."""

    def __init__(self, pid: int) -> None:
        self.pid, self.alive, self.killed = pid, True, False

    def kill(self) -> None:
        self.alive, self.killed = False, True

    async def wait(self) -> int:
        return -9


class Launcher:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.launched = fail, []  # type: ignore[var-annotated]

    async def __call__(self, spec: VmSpec, session: str) -> WarmQemu:
        await asyncio.sleep(0)
        if self.fail:
            raise QemuError("qemu-system-x86_64: cannot start")
        proc = FakeProcess(100 + len(self.launched))
        self.launched.append((spec.name, session))
        return WarmQemu(spec.name, session, machine_of(spec), proc, [], [])  # type: ignore[arg-type]


async def settle(warm: WarmStandbys) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.gather(*warm._tasks)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_one_is_started_per_committed_session_and_replaced_when_the_session_changes() -> None:
    async def go() -> None:
        launch = Launcher()
        warm = WarmStandbys(launch)
        warm.keep({"trade": (SPEC, "s1")})
        warm.keep({"trade": (SPEC, "s1")})  # (a launch under way: not a second one)
        await settle(warm)
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        assert launch.launched == [("trade", "s1")]
        first = warm.ready["trade"].qemu
        warm.keep({"trade": (SPEC, "s2")})  # a new session: the old QEMU goes, a new one comes
        await settle(warm)
        warm.keep({"trade": (SPEC, "s2")})
        await settle(warm)
        assert first.killed and launch.launched == [("trade", "s1"), ("trade", "s2")]
        assert warm.ready["trade"].session == "s2"
    run(go())


def test_it_ends_when_no_longer_wanted_when_its_qemu_dies_or_the_definition_changes() -> None:
    async def go() -> None:
        warm = WarmStandbys(Launcher())
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        qemu = warm.ready["trade"].qemu
        warm.keep({})  # the session ended, or this host is no longer the partner
        await settle(warm)
        assert qemu.killed and "trade" not in warm.ready

        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        warm.ready["trade"].qemu.alive = False  # type: ignore[misc]
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        assert "trade" not in warm.ready

        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        qemu = warm.ready["trade"].qemu
        warm.keep({"trade": (replace(SPEC, memory_mib=512), "s1")})
        await settle(warm)
        assert qemu.killed
    run(go())


def test_a_taken_over_vm_keeps_its_qemu_for_its_start_and_a_start_takes_it_once() -> None:
    async def go() -> None:
        warm = WarmStandbys(Launcher())
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        warm.reserve("trade")
        warm.keep({})  # the standby is gone (taken over): kept for the start
        await settle(warm)
        got = await warm.take("trade")
        assert got is not None and not got.qemu.killed
        assert got.fits(SPEC, "s1") and not got.fits(SPEC, "s0") and not got.fits(SPEC, None)
        assert not got.fits(replace(SPEC, vcpus=2), "s1")
        assert not got.fits(replace(SPEC, nics=(NicSpec("52:54:00:00:00:04"),)), "s1")
        assert got.fits(replace(SPEC, checkpoint_ms=250, desired=SPEC.desired), "s1")  # not the command line
        assert await warm.take("trade") is None
    run(go())


def test_a_reservation_whose_start_never_comes_ends() -> None:
    async def go() -> None:
        warm = WarmStandbys(Launcher())
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        warm.reserve("trade")
        qemu = warm.ready["trade"].qemu
        assert warm.ready["trade"].reserved_at is not None
        warm.ready["trade"].reserved_at -= RESERVE_S + 1  # type: ignore[operator]
        warm.keep({})
        await settle(warm)
        assert qemu.killed and "trade" not in warm.ready
    run(go())


def test_a_failed_launch_is_retried_later_not_at_every_look() -> None:
    async def go() -> None:
        launch = Launcher(fail=True)
        warm = WarmStandbys(launch)
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        assert "trade" not in warm.ready and "trade" in warm._failed
        launch.fail = False
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        assert "trade" not in warm.ready  # backing off
        warm._failed["trade"] = 0.0
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        assert "trade" in warm.ready
    run(go())


def test_without_a_launcher_nothing_is_started() -> None:
    async def go() -> None:
        warm = WarmStandbys(None)
        warm.keep({"trade": (SPEC, "s1")})
        await settle(warm)
        assert warm.ready == {}
    run(go())


def test_closing_ends_every_one() -> None:
    async def go() -> None:
        warm = WarmStandbys(Launcher())
        warm.keep({"trade": (SPEC, "s1"), "db": (replace(SPEC, name="db"), "s9")})
        await settle(warm)
        procs = [w.qemu for w in warm.ready.values()]
        await warm.close()
        assert len(procs) == 2 and all(p.killed for p in procs) and warm.ready == {}
    run(go())
