"""QemuVm and the migration waits against the fake QEMU (tests/fake_qemu.py): the
QMP conversation, stop outcomes and migration failures, without root or QEMU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fake_qemu import FakeQemu
from ftvm.agent.migration import wait_received
from ftvm.core.model import DiskSpec, Level, NicSpec, VmSpec
from ftvm.qemu.migrate import MigrationFailed, wait_migration

SPEC = VmSpec("web", Level.RESTART, 256, 1, (DiskSpec("/s/web.img"),), (NicSpec("52:54:00:00:00:01"),))


@pytest.fixture
async def fake(tmp_path: Path):
    f = FakeQemu(tmp_path / "run")
    yield f
    await f.close()


async def test_wait_migration_reports_progress_until_done(fake: FakeQemu) -> None:
    fake.migrate_states = ["setup", "active", "active", "completed"]
    vm = await fake.start_vm(SPEC)
    seen: list[str] = []

    async def progress(info: dict) -> None:  # type: ignore[type-arg]
        seen.append(info["status"])
    info = await wait_migration(vm, "migration", progress=progress, poll=0.001)
    assert info["status"] == "completed" and seen == ["setup", "active", "active"]
    await vm.stop(0.0)


async def test_a_failed_migration_says_why_and_a_stuck_one_times_out(fake: FakeQemu) -> None:
    fake.migrate_states = ["active", "failed"]
    fake.migrate_error = "Unable to write to socket: Broken pipe"
    vm = await fake.start_vm(SPEC)
    with pytest.raises(MigrationFailed, match="incoming migration failed: Unable to write to socket"):
        await wait_received(vm, timeout=5)
    fake.migrate_states = ["active"]
    with pytest.raises(MigrationFailed, match="not done after 0.05 s"):
        await wait_migration(vm, "migration", timeout=0.05, poll=0.001)
    fake.migrate_states = ["pre-switchover"]
    assert (await wait_migration(vm, "switch", ("pre-switchover",)))["status"] == "pre-switchover"
    await vm.stop(0.0)


async def test_stop_asks_the_guest_first_and_says_how_it_ended(tmp_path: Path) -> None:
    # the guest powers off when asked
    fake = FakeQemu(tmp_path / "a")
    fake.powers_off_after = 0.05
    vm = await fake.start_vm(SPEC)
    await vm.stop(30.0)
    assert vm.stop_outcome == "guest" and fake.commands() == ["system_powerdown"]
    await fake.close()
    # the guest ignores the button: QEMU is quit once the grace is over
    fake = FakeQemu(tmp_path / "b")
    fake.powers_off_after = None
    vm = await fake.start_vm(SPEC)
    await vm.stop(0.1)
    assert vm.stop_outcome == "grace expired" and fake.commands() == ["system_powerdown", "quit"]
    await fake.close()
    # `vm stop --force` during the wait hurries it
    fake = FakeQemu(tmp_path / "c")
    fake.powers_off_after = None
    vm = await fake.start_vm(SPEC)
    hurry = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, hurry.set)
    await vm.stop(30.0, hurry)
    assert vm.stop_outcome == "hurried" and fake.commands() == ["system_powerdown", "quit"]
    await fake.close()


async def test_qemu_events_reach_the_agent_and_errors_are_qmp_errors(fake: FakeQemu) -> None:
    from ftvm.qemu.process import QmpError
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    vm = await fake.start_vm(SPEC, on_event=lambda name, data: events.append((name, data)))
    fake.emit("BLOCK_IO_ERROR", {"device": "", "node-name": "disk0-file", "operation": "write", "action": "stop"})
    await vm.execute("stop")
    fake.fail("blockdev-add", "Could not open '/x': No such file or directory")
    with pytest.raises(QmpError, match="blockdev-add: Could not open") as refused:
        await vm.execute("blockdev-add", {"node-name": "n"})
    assert refused.value.error_class == "GenericError"
    for _ in range(100):
        if len(events) >= 2:
            break
        await asyncio.sleep(0.01)
    assert [n for n, _ in events] == ["BLOCK_IO_ERROR", "STOP"]
    assert events[0][1]["node-name"] == "disk0-file"
    vm.kill()
    assert await vm.wait() != 0 and not vm.alive
