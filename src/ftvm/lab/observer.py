"""An outside witness for "never two copies": watches /proc, not ftvm's own records.

Every `interval` it lists the QEMU processes whose command line names the VM
(`-name guest=<vm>,...`) and notes in which lab namespace each one runs. The
largest number seen at once must stay at 1.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field


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


def find_copies(vm: str) -> list[tuple[int, str]]:
    """(pid, namespace) of every live QEMU running `vm`."""
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
        while not self._stop.is_set():
            copies = find_copies(self.vm)
            self.samples += 1
            self.max_copies = max(self.max_copies, len(copies))
            if len(copies) > 1:
                self.overlaps.append((time.time(), copies))
            for _, ns in copies:
                if not self.hosts_seen or self.hosts_seen[-1] != ns:
                    self.hosts_seen.append(ns)
            self._stop.wait(self.interval)

    def __enter__(self) -> CopyObserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
