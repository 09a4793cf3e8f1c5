"""The fence guard: kills this host's VMs before its lease can expire in etcd.

Two guards hold the same deadline. Each QEMU's keeper (qemu/keeper.py) reads it from
`deadline_file`, which this guard rewrites whenever the deadline moves: the keepers
fence even when no agent runs (killed, stopped, restarting). And this thread, inside
the agent, kills through pidfds as well and records the fence as an event. It runs in
its own thread, not in the asyncio loop, so a stuck loop (a slow etcd call, a bug)
cannot stop it. The loop only moves the deadline forward after each successful
keepalive.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..qemu.keeper import write_deadline

log = logging.getLogger(__name__)


class FenceGuard:
    def __init__(self, check_interval: float, on_fence: Callable[[list[str], float], None],
                 deadline_file: Path | None = None) -> None:
        """`deadline_file`: where the keepers read the deadline (None: no keepers, tests)."""
        self._check = check_interval
        self.deadline_file = deadline_file
        self._on_fence = on_fence
        self._lock = threading.Lock()
        self._deadline = 0.0  # time.monotonic(); 0 = no valid lease
        self.lease = 0
        self._pidfds: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fence-guard", daemon=True)
        self.fenced_at: float | None = None  # wall clock of the last self-fence

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def arm(self, deadline: float, lease: int = 0) -> None:
        """Lease `lease` renewed: VMs may run until `deadline` (monotonic). A new lease (the
        host joined again) ends the keepers of every VM started under the old one."""
        with self._lock:
            if lease != self.lease:
                self.lease, self._deadline = lease, 0.0
            self._deadline = max(self._deadline, deadline)
            self._publish()

    def disarm(self) -> None:
        """Lease known lost: fence now."""
        with self._lock:
            self._deadline = 0.0
            self._publish()
        self._fence_if_due()

    def _publish(self) -> None:
        """(lock held: the file never goes back to an older deadline.) A write that fails
        leaves the keepers on the older deadline: they fence sooner, never later."""
        if self.deadline_file is None:
            return
        try:
            write_deadline(self.deadline_file, self.lease, self._deadline)
        except OSError as e:
            log.error("cannot write the fence deadline for the keepers (%s): they keep the older one", e)

    def may_run(self) -> bool:
        with self._lock:
            return time.monotonic() < self._deadline

    def remaining(self) -> float:
        with self._lock:
            return self._deadline - time.monotonic()

    def register(self, name: str, pidfd: int) -> None:
        """Guard a freshly started QEMU; kills it at once if the lease is already too old."""
        with self._lock:
            self._pidfds[name] = pidfd
        self._fence_if_due()

    def unregister(self, name: str) -> None:
        with self._lock:
            self._pidfds.pop(name, None)

    def _run(self) -> None:
        while not self._stop.wait(self._check):
            self._fence_if_due()

    def _fence_if_due(self) -> None:
        with self._lock:
            if not self._pidfds or time.monotonic() < self._deadline:
                return
            victims = dict(self._pidfds)
            self._pidfds.clear()
        for pidfd in victims.values():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass  # already gone
        self.fenced_at = time.time()
        log.warning("self-fence: lease about to expire, killed %s", ", ".join(sorted(victims)))
        self._on_fence(sorted(victims), self.fenced_at)
