"""The agent's executor, tick by tick, against a real etcd and the fake QEMU: a real
`Agent` (lease, store, decisions, handlers, process watcher) whose QEMUs are fake ones
(tests/fake_qemu.py). No root, no QEMU binary; the ticks are driven by the test, so
every step is observed in the store where an operator would see it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from fake_qemu import FakeQemu
from ftvm.agent.agent import Agent
from ftvm.agent.config import AgentConfig
from ftvm.core.decide import Action
from ftvm.core.model import Desired, DiskSpec, Level, NicSpec, RunState, VmSpec
from ftvm.qemu.cmdline import VmPaths
from ftvm.qemu.probe import TCG
from ftvm.qemu.process import QemuError, QemuVm

_pools = itertools.count()


@dataclass
class Host:
    """One agent, and the fake QEMUs it started (newest last)."""

    agent: Agent
    shared: Path
    fakes: list[FakeQemu] = field(default_factory=list)
    refuse_start: str = ""  # a start fails with this QemuError

    async def ticks(self, n: int = 1) -> list[Action]:
        done: list[Action] = []
        for _ in range(n):
            done += [d.action for d in (await self.agent.tick()).actions()]
        return done

    async def events(self, vm: str) -> list[tuple[str, str]]:
        events, _ = await self.agent.store.events(limit=200)
        return [(e.kind, e.message) for e in events if e.vm == vm]


async def until(what: str, cond: Callable[[], bool]) -> None:
    """Wait on observable state (a QEMU exit is seen by the agent's watcher task)."""
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def host(etcd_url: str, tmp_path: Path) -> AsyncIterator[Host]:
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "state").mkdir()
    cfg = AgentConfig("h1", f"exec{next(_pools)}", (etcd_url,), tmp_path / "state", "br-none", 2048, 2,
                      (str(shared),), stop_grace=5.0, ram_dir=tmp_path / "ram")
    agent = Agent(cfg)
    h = Host(agent, shared)
    agent.procs.accel = TCG

    async def launch(spec: VmSpec, paths: VmPaths, **how: Any) -> QemuVm:
        if h.refuse_start:
            raise QemuError(h.refuse_start)
        fake = FakeQemu(tmp_path / f"qemu{len(h.fakes)}")
        h.fakes.append(fake)
        return await fake.start_vm(spec, on_event=lambda name, data: agent.procs.on_qemu_event(spec.name, name, data))
    agent.procs.launch = launch  # type: ignore[method-assign]
    await agent.host_lease.join()
    agent.guard.start()
    keepalive = asyncio.create_task(agent.host_lease.keep_alive())
    try:
        yield h
    finally:
        keepalive.cancel()
        for fake in h.fakes:
            await fake.close()
        agent.guard.close()
        await agent.host_lease.revoke()
        await agent.etcd.close()


async def define_running(h: Host, name: str = "web") -> None:
    image = h.shared / f"{name}.img"
    image.write_bytes(b"\0" * 4096)
    spec = VmSpec(name, Level.RESTART, 256, 1, (DiskSpec(str(image)),), (NicSpec("52:54:00:00:00:01"),),
                  desired=Desired.RUNNING)
    assert await h.agent.store.define_vm(spec)


async def test_a_vm_is_claimed_then_started_and_reported_running(host: Host) -> None:
    await define_running(host)
    assert await host.ticks() == [Action.CLAIM]
    assert await host.ticks() == [Action.START]
    snap = await host.agent.store.snapshot()
    view = snap.vms["web"]
    assert view.owner is not None and view.owner.host == "h1"
    assert view.status is not None and view.status.state is RunState.RUNNING
    assert view.status.token == view.owner.token and len(host.fakes) == 1
    assert [k for k, _ in await host.events("web")] == ["claim", "start"]
    assert host.fakes[0].commands() == ["announce-self"]  # level 1: not paused, the LAN told where it is
    assert await host.ticks() == []  # running as desired: nothing more to do


async def test_a_crash_is_recorded_and_restarted_after_its_backoff(host: Host) -> None:
    await define_running(host)
    await host.ticks(2)
    rec = host.agent.vms["web"]
    host.fakes[0].exit()  # QEMU dies, unasked
    await until("the watcher sees the exit", lambda: rec.state is RunState.CRASHED)
    assert rec.failures == 1 and rec.retry_at > 0  # died young: backs off
    assert "QEMU exited unasked" in rec.detail
    # within the back-off the decision repeats but nothing is launched
    rec.retry_at = asyncio.get_running_loop().time() + 3600  # (monotonic, as the agent's)
    assert Action.START in await host.ticks() and len(host.fakes) == 1
    history = (await host.agent.store.history("web"))["web"]  # (the tick wrote the journal)
    assert [r.kind for r in history][-1] == "down"
    rec.retry_at = 0.0
    assert Action.START in await host.ticks()
    assert len(host.fakes) == 2 and host.agent.vms["web"].state is RunState.RUNNING


async def test_a_start_that_fails_backs_off_and_says_why(host: Host) -> None:
    await define_running(host)
    host.refuse_start = "disk image /x does not exist"
    await host.ticks(2)
    rec = host.agent.vms["web"]
    assert rec.state is RunState.CRASHED and rec.failures == 1
    assert any(k == "error" and "start failed: disk image /x does not exist" in m for k, m in await host.events("web"))
    status = (await host.agent.store.snapshot()).vms["web"].status
    assert status is not None and status.state is RunState.CRASHED
    host.refuse_start = ""
    rec.retry_at = 0.0
    await host.ticks()
    assert host.agent.vms["web"].state is RunState.RUNNING and host.agent.vms["web"].failures == 1


async def test_a_stop_asks_the_guest_then_releases_the_vm(host: Host) -> None:
    await define_running(host)
    await host.ticks(2)
    got = await host.agent.store.spec("web")
    assert got is not None
    assert await host.agent.store.update_spec(replace(got[0], desired=Desired.STOPPED), got[1])
    assert await host.ticks() == [Action.STOP]
    await until("the guest powered off", lambda: host.agent.vms["web"].state is RunState.STOPPED)
    assert host.fakes[0].commands() == ["announce-self", "system_powerdown"]  # asked, and it powered off
    assert Action.RELEASE in await host.ticks()
    view = (await host.agent.store.snapshot()).vms["web"]
    assert view.owner is None and "web" not in host.agent.vms
    assert any(k == "stop" and "the guest powered off" in m for k, m in await host.events("web"))


async def test_a_copy_running_here_without_ownership_is_killed(host: Host) -> None:
    await define_running(host)
    await host.ticks(2)
    token = host.agent.vms["web"].token
    assert await host.agent.store.release("web", token)  # ownership gone behind the agent's back
    actions = await host.ticks()
    assert actions[0] is Action.KILL  # kills first, before anything else this tick
    await until("the fake QEMU is dead", lambda: not host.agent.vms["web"].qemu.alive)  # type: ignore[union-attr]
    assert any(k == "kill" for k, _ in await host.events("web"))


async def test_a_level3_replica_this_host_no_longer_keeps_is_freed(host: Host) -> None:
    """Its partner was replaced while this host was away: the RAM file (tmpfs, the guest's
    size) goes at the next tick; the one of a VM this host still keeps a copy of stays."""
    from ftvm.core.model import HostInfo
    from ftvm.core.replication import Copies, Copy, CopyState
    from ftvm.l3.standby import RAM_DIR_MARKER
    store = host.agent.store
    lease, _ = await host.agent.etcd.lease_grant(30)
    assert await store.register_host(HostInfo("h2", 4096, 4, ()), lease)
    for name, partner in (("gone", "h3"), ("kept", "h1")):
        spec = VmSpec(name, Level.SYSTEM, 256, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:09"),),
                      desired=Desired.RUNNING, preferred_host="h2")
        assert await store.define_vm(spec)
        copies = Copies(1, {"h2": Copy(CopyState.CURRENT, 0.0, "x"), partner: Copy(CopyState.OUTDATED, 0.0, "x")})
        assert await store.claim(name, "h2", lease, None, copies) is not None
        ram = host.agent.cfg.guest_ram_dir / name
        ram.mkdir(parents=True)
        (ram / RAM_DIR_MARKER).write_text("")
    await host.ticks()
    await until("the replica no longer kept is set aside", lambda: not (host.agent.cfg.guest_ram_dir / "gone").exists())
    assert (host.agent.cfg.guest_ram_dir / "kept").is_dir()
    await host.agent.etcd.lease_revoke(lease)
