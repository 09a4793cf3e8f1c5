"""Each running VM's write-rate trace, recorded by the host that runs it: the bytes its guest
wrote each second (QEMU's block counters, `query-blockstats`), for the DR modeler
(`ftvm dr model VM`, core/dr_model.py), which predicts the lag a WAN link would give.

One file per VM, `state_dir/traces/<vm>.csv`: `unix time,bytes` per second, the newest
MAX_SECONDS kept. A VM that moves goes on in the file of its new host (the trace served is
the owner's: since the VM last came to it). Served through the API (`GET
/api/v1/vms/{name}/write-trace`, api/console.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import suppress
from pathlib import Path

from ..core.model import RunState
from ..qemu.process import QemuError
from .local import LocalRecord

log = logging.getLogger("ftvm.agent.trace")
SAMPLE_S = 1.0
MAX_SECONDS = 24 * 3600          # a day of samples per VM (~0.5 MiB)


def _written(stats: list[dict[str, object]]) -> int:
    """Bytes the guest wrote through its devices (block backends with a device)."""
    total = 0
    for dev in stats:
        s = dev.get("stats")
        if isinstance(s, dict) and (dev.get("qdev") or dev.get("device")):
            total += int(s.get("wr_bytes", 0))
    return total


class WriteTraces:
    def __init__(self, state_dir: Path, vms: dict[str, LocalRecord]) -> None:
        self.dir = state_dir / "traces"
        self.vms = vms
        self.last: dict[str, tuple[object, int]] = {}   # vm -> (its QEMU, wr_bytes at the last sample)
        self.lines: dict[str, int] = {}                  # vm -> lines in its file (trimmed past 2 x MAX)

    def path(self, vm: str) -> Path:
        return self.dir / f"{vm}.csv"

    async def run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            await asyncio.sleep(SAMPLE_S)
            now = time.time()
            for name, rec in list(self.vms.items()):
                if rec.state is not RunState.RUNNING or rec.qemu is None or not rec.qemu.alive:
                    self.last.pop(name, None)
                    continue
                try:
                    written = _written(await asyncio.wait_for(rec.qemu.execute("query-blockstats"), 2.0))
                except (QemuError, OSError, asyncio.TimeoutError, ValueError, TypeError):
                    continue
                before = self.last.get(name)
                self.last[name] = (rec.qemu, written)
                if before is None or before[0] is not rec.qemu or written < before[1]:
                    continue  # (a new QEMU: its counters start again)
                with suppress(OSError):
                    await asyncio.to_thread(self._append, name, f"{now:.0f},{written - before[1]}\n")

    def _append(self, vm: str, line: str) -> None:
        path = self.path(vm)
        with open(path, "a") as f:
            f.write(line)
        n = self.lines.get(vm)
        if n is None:
            with open(path) as f:
                n = sum(1 for _ in f)
        else:
            n += 1
        if n > 2 * MAX_SECONDS:  # keep the newest MAX_SECONDS
            with open(path) as f:
                keep = f.readlines()[-MAX_SECONDS:]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
            n = len(keep)
        self.lines[vm] = n


def read_trace(path: Path, seconds: int) -> str:
    """The newest `seconds` samples of a trace file, as `seconds since the first,bytes` lines
    (what `dr model --trace` reads); gaps (the VM stopped) are filled with zeros."""
    try:
        with open(path) as f:
            rows = f.readlines()[-2 * seconds:]
    except FileNotFoundError:
        return ""
    samples: list[tuple[int, int]] = []
    for line in rows:
        t, _, b = line.strip().partition(",")
        if t.isdigit() and b.isdigit():
            samples.append((int(t), int(b)))
    if not samples:
        return ""
    end = samples[-1][0]
    start = max(samples[0][0], end - seconds + 1)
    by_second = dict(samples)
    return "".join(f"{t - start},{by_second.get(t, 0)}\n" for t in range(start, end + 1))
