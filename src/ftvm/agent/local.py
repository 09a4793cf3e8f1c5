"""What an agent knows about the VMs it runs (or ran, or is receiving)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..core.model import RunState, VmStatus
from ..qemu.blockgraph import LocalImage
from ..qemu.process import QemuVm
from .disks import IncomingDisks
from .l3 import L3Primary
from .replica import ReplicaManager


@dataclass
class LocalRecord:
    """One VM on this host: its QEMU, the token it runs under, and its data planes."""

    name: str
    token: int
    state: RunState
    qemu: QemuVm | None = None
    exit_code: int | None = None
    detail: str = ""
    reported: VmStatus | None = None
    since: float = field(default_factory=time.time)
    failures: int = 0       # consecutive starts that failed or died young
    retry_at: float = 0.0   # monotonic time before which no new start is tried
    replica: ReplicaManager | None = None  # level 2 data plane
    # copies a running 2 -> 0 lowering left this QEMU on: their nodes still skip flushes,
    # so they stay checked (Agent._check_write_through) until the QEMU ends
    kept_write_through: list[LocalImage] = field(default_factory=list)
    incoming_disks: IncomingDisks | None = None  # level 2 migration target: the copy it opened
    l3: L3Primary | None = None            # level 3 checkpointing
    stop_hurry: asyncio.Event = field(default_factory=asyncio.Event)  # `vm stop --force` during a stop
    guest_failure: str | None = None  # the guest failed on its own (core/guest_failures.py): the cause
    guest_booted: float = field(default_factory=time.monotonic)  # started or reset here (health grace)


_background: set[asyncio.Task[Any]] = set()


def spawn(work: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
    """`asyncio.create_task` that holds the task until it ends (the loop keeps only a weak
    reference: an unheld task can be collected half-way)."""
    task = asyncio.create_task(work, name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task
