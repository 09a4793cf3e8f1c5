"""Exact dirty-page tracking (l3/writes.py) against this kernel: a child process standing
in for QEMU (the shim loaded with LD_PRELOAD, a shared file mapped, pages written on
command, from user space and from the kernel) and the agent's side attaching to it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ftvm.l3.pages import PAGE, PageTracker, ReplicaFile
from ftvm.l3.writes import TrackerError, WriteTracker, build_shim, probe, shim_env

PAGES = 4096  # a 16 MiB "RAM" file

CHILD = r"""
import mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, size)  # MAP_SHARED, as QEMU maps a share=on memory-backend-file
src = os.open("/dev/urandom", os.O_RDONLY)
print("ready", flush=True)
for line in sys.stdin:
    kind, *pages = line.split()
    for p in map(int, pages):
        if kind == "w":    # the guest writes (user space)
            m[p * 4096 + (p % 4000)] = (m[p * 4096 + (p % 4000)] + 1) % 256
        else:              # a disk read lands in guest RAM (the kernel writes)
            os.preadv(src, [memoryview(m)[p * 4096:(p + 1) * 4096]], 0)
    print("ok", flush=True)
"""


class Guest:
    def __init__(self, ram: Path, shim: Path | None) -> None:
        env = {**os.environ, **(shim_env(shim) if shim else {})}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ram), str(PAGES * PAGE)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.pidfd = os.pidfd_open(self.proc.pid)

    def write(self, pages: list[int], kernel: bool = False) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(("r " if kernel else "w ") + " ".join(map(str, pages)) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.pidfd)


@pytest.fixture
def ram(tmp_path: Path) -> Path:
    f = Path("/dev/shm") / f"ftvm-test-ram-{os.getpid()}-{tmp_path.name}"
    f.write_bytes(b"")
    os.truncate(f, PAGES * PAGE)
    yield f  # type: ignore[misc]
    f.unlink(missing_ok=True)


@pytest.fixture
def guest(ram: Path, tmp_path: Path) -> Iterator[Guest]:
    support = probe(None)
    assert support.exact, support.why  # this machine's kernel has it (FACTS.md); CI must too
    g = Guest(ram, build_shim(tmp_path / "shim"))
    yield g
    g.close()


def test_the_scan_reports_exactly_the_pages_written_by_user_space_and_by_the_kernel(guest: Guest, ram: Path) -> None:
    tracker = WriteTracker.attach(guest.proc.pid, guest.pidfd, ram)
    try:
        assert len(tracker.scan()) == 0  # armed: nothing written yet
        rng = np.random.default_rng(7)
        missed = extra = 0
        for _ in range(40):
            user = sorted(set(rng.integers(0, PAGES, 50).tolist()))
            kernel = sorted(set(rng.integers(0, PAGES, 5).tolist()))
            guest.write(user)
            guest.write(kernel, kernel=True)
            got = set(tracker.scan().tolist())
            want = set(user) | set(kernel)
            missed += len(want - got)
            extra += len(got - want)
        assert (missed, extra) == (0, 0)
        assert tracker.scans == 41
    finally:
        tracker.close()


def test_a_tracked_replica_is_byte_identical_after_many_checkpoints(guest: Guest, ram: Path, tmp_path: Path) -> None:
    """The engine's use: pre-copy while the 'guest' writes, then stopped epochs that send
    only the reported pages; the replica equals the file at every checkpoint."""
    live = PageTracker(ram, WriteTracker.attach(guest.proc.pid, guest.pidfd, ram))
    replica = ReplicaFile(tmp_path / "replica", live.size)
    rng = np.random.default_rng(11)
    try:
        assert live.copy is None  # no second copy of guest RAM in the agent
        guest.write(list(range(0, PAGES, 3)))
        for delta in live.precopy_chunks():
            replica.apply(delta)
            guest.write(rng.integers(0, PAGES, 30).tolist())  # the guest runs during the pre-copy
        sent = []
        for _ in range(60):
            guest.write(rng.integers(0, PAGES, 40).tolist())
            guest.write(rng.integers(0, PAGES, 3).tolist(), kernel=True)
            delta = live.diff()  # (the child waits on stdin: "stopped")
            sent.append(len(delta.pages))
            replica.apply(delta)
            assert replica.pages.tobytes() == ram.read_bytes()
        # the first epoch also resends what was written during the pre-copy; after it, only
        # the pages of the epoch (at most 43 drawn)
        assert sent[0] > 43 and all(0 < n <= 43 for n in sent[1:]) and live.full_resyncs == 0
    finally:
        live.close()
        replica.close()


def test_a_failed_scan_sends_every_page_and_protects_them_all_again(tmp_path: Path, ram: Path) -> None:
    class FailingScan:
        first_page, npages, armed = 0, PAGES, 0

        def scan(self) -> np.ndarray:
            raise TrackerError(1, "PAGEMAP_SCAN: Operation not permitted")

        def arm(self) -> None:
            self.armed += 1

        def close(self) -> None:
            pass
    writes = FailingScan()
    live = PageTracker(ram, writes)  # type: ignore[arg-type]
    try:
        delta = live.diff()
        assert len(delta.pages) == PAGES and writes.armed == 1
        assert live.full_resyncs == 1 and "Operation not permitted" in live.last_error
    finally:
        live.close()


def test_a_qemu_started_without_the_shim_cannot_be_tracked_and_says_so(ram: Path) -> None:
    g = Guest(ram, None)
    try:
        with pytest.raises(TrackerError, match="no userfaultfd from the shim"):
            WriteTracker.attach(g.proc.pid, g.pidfd, ram)
    finally:
        g.close()
