"""An outside witness for "never two copies": watches /proc, not ftvm's own records.

Every `interval` it lists the QEMU processes whose command line names the VM
(`-name guest=<vm>,...`) and that have run the guest, and notes in which lab namespace
each one runs. The largest number seen at once must stay at 1.

*Has run the guest* is read from the vCPU threads (named "CPU <n>/<accel>", QEMU's
`debug-threads=on`): their time on a CPU, from /proc/PID/task/TID/schedstat. A QEMU that
waits for an incoming state (a level 3 partner's standby started ahead of a takeover, a
live migration's target) has vCPU threads that ran only their start-up, 0.05-0.3 ms here;
a guest that runs uses more than `RAN_NS` within its first few milliseconds (under TCG
every block it executes is translated first). A QEMU started with debug-threads whose vCPU
threads do not exist yet is still starting: it runs nothing either. One started without
debug-threads always counts.

`max_copies` counts every such QEMU, a paused one too. `max_executing` counts, in each
stretch of time when more than one existed, those whose guest executed meanwhile (their
vCPU time grew at all between the first and the last sample that saw them): a copy that
was stopped before another began (a level 3 primary cut off from its partner and from the
quorum service keeps its guest stopped, output held, until its fence guard kills it) is
frozen, and its vCPU time stays exactly the same.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

RAN_NS = 5_000_000  # vCPU time above which a QEMU has run its guest (see above)


def _netns_names() -> dict[int, str]:
    """inode of each named network namespace -> its name."""
    out = {}
    try:
        for name in os.listdir("/run/netns"):
            try:
                out[os.stat(f"/run/netns/{name}").st_ino] = name
            except OSError:
                pass
    except FileNotFoundError:
        pass
    return out


def vcpu_run_ns(pid: int) -> int | None:
    """Time on a CPU of a QEMU's vCPU threads (ns), None if none is named as one."""
    total, named = 0, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
                if not f.read().startswith(b"CPU "):
                    continue
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
            named = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total if named else None


def find_copies(vm: str, waiting_too: bool = False) -> list[tuple[int, str]]:
    """(pid, namespace) of every live QEMU running `vm`; `waiting_too`: also those whose
    guest has not run yet (an incoming standby or migration target)."""
    marker = f"guest={vm},".encode()
    names = _netns_names()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            if not cmd.startswith(b"qemu-system") or marker not in cmd:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie runs nothing
            ino = os.stat(f"/proc/{entry}/ns/net").st_ino
        except (OSError, IndexError):
            continue
        if not waiting_too:
            ran = vcpu_run_ns(int(entry))
            if (ran is None and b"debug-threads=on" in cmd) or (ran is not None and ran < RAN_NS):
                continue
        found.append((int(entry), names.get(ino, "?")))
    return found


@dataclass
class CopyObserver:
    vm: str
    interval: float = 0.02
    max_copies: int = 0
    samples: int = 0
    overlaps: list[tuple[float, list[tuple[int, str]]]] = field(default_factory=list)
    hosts_seen: list[str] = field(default_factory=list)  # namespaces, in the order seen
    max_executing: int = 0     # see the module's docstring
    frozen_overlap_s: float = 0.0  # how long a stopped copy coexisted with a running one

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"observe-{self.vm}")

    def start(self) -> CopyObserver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        first: dict[int, int] = {}  # during an overlap: each copy's vCPU time when first seen in it
        last: dict[int, int] = {}
        since = 0.0
        while not self._stop.is_set():
            copies = find_copies(self.vm)
            self.samples += 1
            self.max_copies = max(self.max_copies, len(copies))
            if len(copies) > 1:
                self.overlaps.append((time.time(), copies))
                now = time.monotonic()
                since = since or now
                for pid, _ in copies:
                    ran = vcpu_run_ns(pid)
                    if ran is not None:
                        first.setdefault(pid, ran)
                        last[pid] = ran
                executing = sum(1 for pid, _ in copies if pid not in first or last[pid] > first[pid])
                self.max_executing = max(self.max_executing, executing)
                if executing <= 1:
                    self.frozen_overlap_s = max(self.frozen_overlap_s, now - since)
            else:
                first, last, since = {}, {}, 0.0
                self.max_executing = max(self.max_executing, len(copies))
            for _, ns in copies:
                if not self.hosts_seen or self.hosts_seen[-1] != ns:
                    self.hosts_seen.append(ns)
            self._stop.wait(self.interval)

    def __enter__(self) -> CopyObserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
