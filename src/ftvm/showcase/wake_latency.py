"""Hold the host's CPUs out of deep idle while a latency benchmark runs.

A request that waits on a round trip leaves every thread on its path idle for that long,
and waking an idle CPU costs time of its own: on this kind of machine (a KVM guest whose
idle driver halts the virtual CPU) tens to hundreds of microseconds per wake-up, several
per request. That cost grows with the wait, so it lands on the protected level (which
waits a round trip) and not on the unprotected one, and is not the protocol's. Latency
benchmarks hold a PM QoS request of 0 (as tuned's latency-performance profile and
cyclictest do) so the CPUs poll instead; the kernel drops it when the file is closed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

QOS_FILE = "/dev/cpu_dma_latency"


@contextmanager
def polling_idle() -> Iterator[bool]:
    """While inside, the CPUs poll when idle; yields whether the request could be made."""
    try:
        fd = os.open(QOS_FILE, os.O_WRONLY)
    except OSError:
        yield False
        return
    try:
        os.write(fd, struct.pack("i", 0))
        yield True
    finally:
        os.close(fd)
