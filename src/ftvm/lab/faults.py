"""Fault injection into a running VM's storage, through the lab's second QMP socket
(agents in the lab run VMs with `debug_qmp`; the agent's own connection is untouched)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, cast

from qemu.qmp import QMPClient

from . import lab as labmod

_LOCAL = re.compile(r"^d(\d+)-local(\d+)$")


async def _inject_disk_failure(sock: Path, vm: str) -> list[str]:
    qmp = QMPClient(f"lab-{vm}")
    await qmp.connect(str(sock))
    try:
        nodes = cast(list[dict[str, Any]], await qmp.execute("query-named-block-nodes", {"flat": True}))
        by_name = {n["node-name"]: n for n in nodes}
        failed = []
        for name, node in sorted(by_name.items()):
            m = _LOCAL.match(name)
            if not m or name + "-f" not in by_name:
                continue
            path = by_name[name + "-f"]["file"]
            inject = f"inject-{name}"
            # Every read and write below this node now fails with EIO, as a dying disk would.
            await qmp.execute("blockdev-add", {
                "driver": "blkdebug", "node-name": inject,
                "image": {"driver": "file", "filename": path, "locking": "off", "cache": {"direct": True}},
                "inject-error": [{"event": ev, "errno": 5, "once": False}
                                 for ev in ("write_aio", "read_aio", "flush_to_disk")]})
            await qmp.execute("blockdev-reopen", {"options": [
                {"driver": node["drv"], "node-name": name, "file": inject}]})
            failed.append(f"{name} ({path})")
        return failed
    finally:
        await qmp.disconnect()


def fail_disk(state: labmod.LabState, vm: str, host: str) -> list[str]:
    """Make the local copy of every disk of `vm` on `host` fail with I/O errors."""
    sock = state.host_dir(host) / "state" / "vms" / vm / "qmp-debug.sock"
    if not sock.exists():
        raise labmod.LabError(f"{vm} does not run on {host} (no {sock})")
    failed = asyncio.run(_inject_disk_failure(sock, vm))
    if not failed:
        raise labmod.LabError(f"{vm} on {host} has no local disk copy in use (is it level 2?)")
    return failed
