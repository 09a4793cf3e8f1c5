"""The keeper (qemu/keeper.py) with a stand-in QEMU (`sleep`): it outlives whoever
started it, still fences at the host's deadline, and says how its process ended."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftvm.qemu import keeper


LEASE = 0x7a11


@pytest.fixture(autouse=True)
def _no_keeper_left(tmp_path: Path) -> Iterator[None]:
    """Whatever a test leaves (a failed assertion before its kill): the keepers of its run
    directory are killed, and with them their processes (PDEATHSIG)."""
    yield
    mark = f"--dir\0{tmp_path}\0".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ftvm.qemu.keeper" in cmd and mark in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)


def _deadline(tmp_path: Path, seconds_from_now: float) -> Path:
    f = tmp_path / "fence-deadline"
    keeper.write_deadline(f, LEASE, time.monotonic() + seconds_from_now)
    return f


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_kill_goes_to_the_kept_process_and_its_code_is_told(tmp_path: Path) -> None:
    deadline = _deadline(tmp_path, 600)
    kept = await keeper.spawn(["sleep", "600"], tmp_path, tmp_path / "log", deadline, LEASE, 0.05, [], None, {})
    assert _alive(kept.pid) and kept.returncode is None
    assert Path(f"/proc/{kept.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
    fd = kept.open_pidfd()
    signal.pidfd_send_signal(fd, signal.SIGKILL)
    os.close(fd)
    assert await asyncio.wait_for(asyncio.gather(kept.wait(), kept.wait()), 10) == [-9, -9]  # two waiters
    assert kept.fenced is False
    kept.close()


async def test_the_keeper_kills_at_the_deadline(tmp_path: Path) -> None:
    deadline = _deadline(tmp_path, 600)
    kept = await keeper.spawn(["sleep", "600"], tmp_path, tmp_path / "log", deadline, LEASE, 0.05, [], None, {})
    keeper.write_deadline(deadline, LEASE, time.monotonic() + 0.3)
    code = await asyncio.wait_for(kept.wait(), 10)
    assert code == -9 and kept.fenced is True
    kept.close()


async def test_an_unreadable_deadline_counts_as_passed(tmp_path: Path) -> None:
    deadline = _deadline(tmp_path, 600)
    kept = await keeper.spawn(["sleep", "600"], tmp_path, tmp_path / "log", deadline, LEASE, 0.05, [], None, {})
    deadline.write_text("garbage\n")
    assert await asyncio.wait_for(kept.wait(), 10) == -9 and kept.fenced
    kept.close()


async def test_a_new_lease_ends_the_guests_of_the_old_one(tmp_path: Path) -> None:
    """The host joined again under a new lease: whatever ran under the old one must die
    (etcd has deleted its ownership records with the old lease)."""
    deadline = _deadline(tmp_path, 600)
    kept = await keeper.spawn(["sleep", "600"], tmp_path, tmp_path / "log", deadline, LEASE, 0.05, [], None, {})
    keeper.write_deadline(deadline, LEASE + 1, time.monotonic() + 600)
    assert await asyncio.wait_for(kept.wait(), 10) == -9 and kept.fenced
    kept.close()


async def test_nothing_starts_after_the_deadline(tmp_path: Path) -> None:
    deadline = _deadline(tmp_path, -1)
    with pytest.raises(keeper.KeeperError, match="fence deadline has passed"):
        await keeper.spawn(["sleep", "600"], tmp_path, tmp_path / "log", deadline, LEASE, 0.05, [], None, {})
    assert not (tmp_path / keeper.KEEPER_FILE).exists()


async def test_a_command_that_cannot_start_is_an_error(tmp_path: Path) -> None:
    deadline = _deadline(tmp_path, 600)
    with pytest.raises(keeper.KeeperError, match="cannot start"):
        await keeper.spawn([str(tmp_path / "no-such-qemu")], tmp_path, tmp_path / "log", deadline, LEASE, 0.05,
                           [], None, {})


async def test_environment_goes_to_the_process_only(tmp_path: Path) -> None:
    """(QEMU's LD_PRELOAD shim at level 3 must not load into the keeper's Python.)"""
    deadline = _deadline(tmp_path, 600)
    kept = await keeper.spawn(["sh", "-c", 'echo "FTVM_TEST=$FTVM_TEST"; exec sleep 600'], tmp_path,
                              tmp_path / "log", deadline, LEASE, 0.05, [], None, {"FTVM_TEST": "shim"})
    for _ in range(1000):  # (the shell has said it before it is killed)
        if "FTVM_TEST=shim" in (tmp_path / "log").read_text():
            break
        await asyncio.sleep(0.01)
    assert b"FTVM_TEST" not in Path(f"/proc/{kept.keeper_pid}/environ").read_bytes()
    assert b"FTVM_TEST=shim" in Path(f"/proc/{kept.pid}/environ").read_bytes()
    os.kill(kept.pid, signal.SIGKILL)
    assert await asyncio.wait_for(kept.wait(), 10) == -9
    assert "FTVM_TEST=shim" in (tmp_path / "log").read_text()
    kept.close()


SPAWNER = """
import asyncio, sys
from pathlib import Path
from ftvm.qemu import keeper
d = Path(sys.argv[1])
kept = asyncio.run(keeper.spawn(["sleep", "600"], d, d / "log", d / "fence-deadline", 0x7a11, 0.05, [], None, {}))
if sys.argv[2] != "none":
    (d / keeper.META_FILE).write_text('{"relayed_nics": %s}' % sys.argv[2])
print(kept.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _spawn_and_kill_spawner(tmp_path: Path, meta: str) -> int:
    _deadline(tmp_path, 600)
    spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, str(tmp_path), meta], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert spawner.stdout is not None
    pid = int(spawner.stdout.readline())
    spawner.kill()
    spawner.wait()
    return pid


async def test_an_adoptable_process_outlives_its_spawner_and_is_found_again(tmp_path: Path) -> None:
    """The agent's death does not end a guest it said may be adopted; the next agent finds
    it; the keeper's death does end it (PDEATHSIG)."""
    pid = _spawn_and_kill_spawner(tmp_path, "false")
    for _ in range(1000):  # (the keeper says it has seen the spawner end)
        if keeper.AGENT_GONE in (tmp_path / "log").read_text():
            break
        await asyncio.sleep(0.01)
    assert keeper.AGENT_GONE in (tmp_path / "log").read_text()
    assert _alive(pid)
    found = keeper.find(tmp_path.parent)
    kept = next(k for k in found if k.pid == pid)
    for k in found:
        if k is not kept:
            k.close()
    assert kept.returncode is None
    json.loads((tmp_path / keeper.KEEPER_FILE).read_text())  # (well formed)
    os.kill(kept.keeper_pid, signal.SIGKILL)
    assert await asyncio.wait_for(kept.wait(), 10) == -9
    for _ in range(200):  # the kernel delivers PDEATHSIG as the keeper exits
        if not _alive(pid):
            break
        await asyncio.sleep(0.01)
    assert not _alive(pid)
    kept.close()


@pytest.mark.parametrize("meta", ["none", "true"])
async def test_any_other_process_ends_with_its_spawner(tmp_path: Path, meta: str) -> None:
    """No record (a warm standby, a migration's target) or NICs through the agent's relays
    (level 3): the guest must not run on unseen once its agent has gone."""
    pid = _spawn_and_kill_spawner(tmp_path, meta)
    for _ in range(1000):  # (the keeper writes how it ended once its QEMU is reaped)
        if (tmp_path / keeper.EXIT_FILE).exists():
            break
        await asyncio.sleep(0.01)
    assert not _alive(pid)
    ended = json.loads((tmp_path / keeper.EXIT_FILE).read_text())
    assert ended == {"code": -9, "fenced": False, "orphaned": True}


async def test_a_stale_keeper_file_names_nothing(tmp_path: Path) -> None:
    (tmp_path / keeper.KEEPER_FILE).write_text(json.dumps(
        {"keeper": os.getpid(), "keeper_start": 1, "qemu": os.getpid(), "qemu_start": 1}))
    assert keeper.attach(tmp_path) is None  # this PID is not that keeper (start time differs)
    (tmp_path / keeper.KEEPER_FILE).write_text("{")
    assert keeper.attach(tmp_path) is None
