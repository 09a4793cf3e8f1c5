"""l3/vcpu_load.py on real threads of this process: a thread that spins reads as busy, one
that sleeps (a halted vCPU) as idle, and a thread that is gone is an OSError, not a guess."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ftvm.l3.vcpu_load import VcpuLoad


def test_a_spinning_thread_is_busy_and_a_sleeping_one_is_not() -> None:
    spin, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        while not done.is_set():
            if spin.is_set():
                sum(range(1000))
            else:
                time.sleep(0.001)

    t = threading.Thread(target=worker)
    t.start()
    try:
        while not tid:
            time.sleep(0.001)
        load = VcpuLoad(os.getpid(), tid)
        try:
            time.sleep(0.05)
            assert load.busy() < 0.3  # asleep nearly all of the time
            spin.set()
            time.sleep(0.05)
            assert load.busy() > 0.5  # (a loaded CI host still gives a spinning thread most of a core)
        finally:
            load.close()
    finally:
        done.set()
        t.join()


def test_a_thread_that_is_not_there_is_refused() -> None:
    with pytest.raises(OSError):
        VcpuLoad(os.getpid(), [2**22 + 12345])
