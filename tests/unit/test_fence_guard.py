"""The fence guard kills a real process when the lease deadline passes, and not before."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from ftvm.agent.fence import FenceGuard


def _sleeper() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(["sleep", "30"])
    return proc, os.pidfd_open(proc.pid)


def test_guard_kills_after_deadline_only() -> None:
    """Not before: a guard armed a minute ahead leaves its VM alone through many looks.
    After: one whose deadline passes kills its VM, then reports it."""
    calm, far = FenceGuard(0.02, lambda names, at: None), _sleeper()
    fenced: list[list[str]] = []
    due, near = FenceGuard(0.02, lambda names, at: fenced.append(names)), _sleeper()
    try:
        calm.arm(time.monotonic() + 60)  # far off: a loaded machine cannot reach it by accident
        calm.register("vm0", far[1])
        calm.start()
        due.arm(time.monotonic() + 0.3)
        due.register("vm1", near[1])
        due.start()
        near[0].wait(timeout=30)
        assert near[0].returncode == -9
        deadline = time.monotonic() + 30
        while not fenced and time.monotonic() < deadline:  # the report follows the kill
            time.sleep(0.01)
        assert fenced == [["vm1"]]
        assert far[0].poll() is None  # the other guard looked every 20 ms all along
    finally:
        for guard, (proc, pidfd) in ((calm, far), (due, near)):
            guard.close()
            proc.kill()
            proc.wait()
            os.close(pidfd)


def test_registering_after_deadline_kills_at_once() -> None:
    guard = FenceGuard(10, lambda names, at: None)  # thread never needed: registration checks
    proc = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        guard.register("vm1", pidfd)  # no lease yet: deadline 0
        assert proc.wait(timeout=3) == -9
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)


def test_renewal_moves_deadline_forward_only() -> None:
    guard = FenceGuard(1, lambda names, at: None)
    now = time.monotonic()
    guard.arm(now + 5)
    guard.arm(now + 1)
    assert guard.remaining() > 4
    guard.disarm()
    assert not guard.may_run()


def test_the_guard_publishes_the_deadline_for_the_keepers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each renewal moves the keepers' deadline on (never back); a new lease ends the old
    one's keepers; a lost lease ends every keeper now."""
    from ftvm.qemu.keeper import may_run, read_deadline
    f = tmp_path / "fence-deadline"
    guard = FenceGuard(1, lambda names, at: None, f)
    now = time.monotonic()
    guard.arm(now + 60, lease=7)
    assert read_deadline(f) == (7, pytest.approx(now + 60, abs=1e-5)) and may_run(f, 7) and not may_run(f, 8)
    guard.arm(now + 30, lease=7)  # an older renewal's answer arriving late: not backwards
    assert read_deadline(f) == (7, pytest.approx(now + 60, abs=1e-5))
    guard.arm(now + 40, lease=8)  # the host joined again: the new lease, its own deadline
    assert read_deadline(f) == (8, pytest.approx(now + 40, abs=1e-5)) and not may_run(f, 7)
    guard.disarm()
    assert not may_run(f, 8)
