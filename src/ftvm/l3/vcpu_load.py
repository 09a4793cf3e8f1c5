"""Level 3: whether the guest is still working, from its vCPU threads' run time.

An output-triggered checkpoint should come once the guest has answered what it was
asked: a reply made of one request waits for nothing, but a guest serving eight clients
at once would be cut off after the first reply, and answer the rest an epoch later. The
vCPU threads tell: a vCPU that has nothing to do halts, and its thread stops running.
`/proc/PID/task/TID/schedstat` gives each thread's time on a CPU in nanoseconds (the
jiffies of `stat` are too coarse for a millisecond), read with one `pread` per thread.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress


class VcpuLoad:
    """`busy()`: the largest share of the time any vCPU thread ran since the last call."""

    def __init__(self, pid: int, tids: list[int]) -> None:
        self._fds: list[int] = []
        try:
            for tid in tids:
                self._fds.append(os.open(f"/proc/{pid}/task/{tid}/schedstat", os.O_RDONLY))
        except OSError:
            self.close()
            raise
        self._last = self._sample()

    def _sample(self) -> tuple[float, list[int]]:
        return time.monotonic(), [int(os.pread(fd, 64, 0).split()[0]) for fd in self._fds]

    def busy(self) -> float:
        """0 (every vCPU halted) to 1 (one ran all the time). OSError if QEMU is gone."""
        (t0, before), (t1, after) = self._last, self._sample()
        self._last = (t1, after)
        elapsed = max(t1 - t0, 1e-6)
        return max((b - a) / 1e9 / elapsed for a, b in zip(before, after, strict=True)) if after else 0.0

    def close(self) -> None:
        for fd in self._fds:
            with suppress(OSError):
                os.close(fd)
        self._fds = []
