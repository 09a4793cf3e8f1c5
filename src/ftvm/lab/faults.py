"""Fault injection into a running VM's storage, through the lab's second QMP socket
(agents in the lab run VMs with `debug_qmp`; the agent's own connection is untouched)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from qemu.qmp import QMPClient

from . import lab as labmod

_LOCAL = re.compile(r"^d(\d+)-local(\d+)$")


def _debug_sock(state: labmod.LabState, vm: str, host: str) -> Path:
    return state.host_dir(host) / "state" / "vms" / vm / "qmp-debug.sock"


@asynccontextmanager
async def _debug_qmp(sock: Path, vm: str) -> AsyncIterator[QMPClient]:
    qmp = QMPClient(f"lab-{vm}")
    await qmp.connect(str(sock))
    try:
        yield qmp
    finally:
        await qmp.disconnect()


async def _named_nodes(qmp: QMPClient) -> dict[str, dict[str, Any]]:
    nodes = cast(list[dict[str, Any]], await qmp.execute("query-named-block-nodes", {"flat": True}))
    return {n["node-name"]: n for n in nodes}


async def _inject_disk_failure(sock: Path, vm: str) -> list[str]:
    async with _debug_qmp(sock, vm) as qmp:
        by_name = await _named_nodes(qmp)
        failed = []
        for name, node in sorted(by_name.items()):
            m = _LOCAL.match(name)
            if not m or name + "-f" not in by_name:
                continue
            path = by_name[name + "-f"]["file"]
            inject = f"inject-{name}"
            # Every read and write below this node now fails with EIO, as a dying disk would.
            # (Not flushes: `clear_disk_failure`'s reopen flushes the node first, and the
            # guest's writes fail anyway.)
            await qmp.execute("blockdev-add", {
                "driver": "blkdebug", "node-name": inject,
                "image": {"driver": "file", "filename": path, "locking": "off", "cache": {"direct": True}},
                "inject-error": [{"event": f"{io}_aio", "iotype": io, "errno": 5, "once": False}
                                 for io in ("write", "read")]})
            await qmp.execute("blockdev-reopen", {"options": [
                {"driver": node["drv"], "node-name": name, "file": inject}]})
            failed.append(f"{name} ({path})")
        return failed


async def _clear_disk_failure(sock: Path, vm: str) -> list[str]:
    async with _debug_qmp(sock, vm) as qmp:
        by_name = await _named_nodes(qmp)
        cleared: list[str] = []
        for name, node in sorted(by_name.items()):
            if not name.startswith("inject-"):
                continue
            path = _injected_file(node)
            over = name.removeprefix("inject-")
            if over in by_name and path is not None:
                # the node reads its file directly again (locking off: the injection's own
                # opening of the file is still there until it is deleted below)
                healed = f"healed-{over}-{len(cleared)}"
                await qmp.execute("blockdev-add", {"driver": "file", "node-name": healed, "filename": path,
                                                   "aio": "native", "locking": "off",
                                                   "cache": {"direct": True, "no-flush": True}})
                await qmp.execute("blockdev-reopen", {"options": [
                    {"driver": by_name[over]["drv"], "node-name": over, "file": healed}]})
            await qmp.execute("blockdev-del", {"node-name": name})
            cleared.append(over)
        return cleared


def _injected_file(node: dict[str, Any]) -> str | None:
    """The image file under a blkdebug node (QEMU names it in the node's `file`, as JSON)."""
    desc = str(node.get("file", ""))
    try:
        image = json.loads(desc.removeprefix("json:")).get("image", {})
    except ValueError:
        return None
    filename = image.get("filename") if isinstance(image, dict) else None
    return filename if isinstance(filename, str) else None


def clear_disk_failure(state: labmod.LabState, vm: str, host: str) -> list[str]:
    """The I/O errors `fail_disk` injected end (a transient failure: a cable, a controller):
    the nodes read their files directly again. Returns the nodes cleared."""
    sock = _debug_sock(state, vm, host)
    if not sock.exists():
        return []
    return asyncio.run(_clear_disk_failure(sock, vm))


SLOW_BPS = 256 << 10  # a slow disk: 256 KiB/s and 10 requests/s for the guest's I/O
SLOW_IOPS = 10


async def _throttle(sock: Path, vm: str, bps: int, iops: int) -> list[str]:
    async with _debug_qmp(sock, vm) as qmp:
        devices = [str(b["qdev"]) for b in cast(list[dict[str, Any]], await qmp.execute("query-block"))
                   if b.get("inserted") and b.get("qdev")]
        for qdev in devices:  # (the guest's view of the disk, above every copy: at every level)
            await qmp.execute("block_set_io_throttle", {"id": qdev, "bps": bps, "bps_rd": 0, "bps_wr": 0,
                                                        "iops": iops, "iops_rd": 0, "iops_wr": 0})
        return devices


def slow_disk(state: labmod.LabState, vm: str, host: str, slow: bool = True) -> list[str]:
    """Make the guest's disks of `vm` on `host` slow (a failing drive retrying, a saturated
    array), or fast again. Returns the devices throttled."""
    sock = _debug_sock(state, vm, host)
    if not sock.exists():
        if slow:
            raise labmod.LabError(f"{vm} does not run on {host} (no {sock})")
        return []  # (it moved or restarted: a new QEMU is not throttled)
    return asyncio.run(_throttle(sock, vm, SLOW_BPS if slow else 0, SLOW_IOPS if slow else 0))


def fail_disk(state: labmod.LabState, vm: str, host: str) -> list[str]:
    """Make the local copy of every disk of `vm` on `host` fail with I/O errors."""
    sock = _debug_sock(state, vm, host)
    if not sock.exists():
        raise labmod.LabError(f"{vm} does not run on {host} (no {sock})")
    failed = asyncio.run(_inject_disk_failure(sock, vm))
    if not failed:
        raise labmod.LabError(f"{vm} on {host} has no local disk copy in use (is it level 2?)")
    return failed
