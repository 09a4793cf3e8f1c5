"""The fence guard kills a real process when the lease deadline passes, and not before."""

from __future__ import annotations

import os
import subprocess
import time

from ftvm.agent.fence import FenceGuard


def test_guard_kills_after_deadline_only() -> None:
    fenced: list[list[str]] = []
    guard = FenceGuard(0.02, lambda names, at: fenced.append(names))
    proc = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        guard.arm(time.monotonic() + 0.5)
        guard.register("vm1", pidfd)
        guard.start()
        time.sleep(0.2)
        assert proc.poll() is None and fenced == []
        proc.wait(timeout=3)
        assert proc.returncode == -9
        assert fenced == [["vm1"]]
    finally:
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
