"""Level 2 block graphs and the QMP steps that change them (pure: plans, not actions).

Every Level 2 disk is a raw node `disk<i>` (what the guest's virtio-blk device
uses, with werror=stop/rerror=stop) whose `file` child is one of:

    MIRRORED     disk<i> -> quorum (vote-threshold 2, read-pattern fifo) -> [local copy, partner copy (NBD)]
    LOCAL_ONLY   disk<i> -> local copy            (partner outdated or being resynced)
    REMOTE_ONLY  disk<i> -> partner copy (NBD)    (local copy failed)

Why quorum with threshold 2: a guest write completes only when *both* copies
have it. When one copy fails the write fails, the device stops the VM
(werror=stop) and the agent records the failed copy as outdated in etcd
*before* it lets the VM continue on the other copy: nothing is ever
acknowledged with one copy while the other is still believed current.
(QEMU 7.2's mirror job acknowledges guest writes even when its target fails.)

Dropping a failed child takes three steps because QEMU 7.2 will not remove a
quorum child below the vote threshold, and blockdev-reopen flushes (which
fails while a child is dead): add a second path to the surviving copy as a
quorum child, remove the failed child (the quorum can now flush), point
`disk<i>` at a third path to the survivor, delete the quorum. The extra paths
are separate file/NBD nodes on the same image (file locking off on them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from .tls import NBD_CLIENT

QmpStep = tuple[str, dict[str, Any]]


class Mode(str, Enum):
    MIRRORED = "mirrored"
    LOCAL_ONLY = "local-only"
    REMOTE_ONLY = "remote-only"


@dataclass(frozen=True)
class LocalImage:
    path: str
    format: str  # raw or qcow2: the two hosts' storage may differ
    # every write to the file is synchronous (writethrough.py), so its nodes skip flushes;
    # True only once verified on the file (storage_daemon.writable_copy)
    write_through: bool = False


@dataclass(frozen=True)
class NbdTarget:
    """Where QEMU reaches a partner's copy of one disk: its NBD export (the store's
    record of that export is `core.model.NbdTarget`)."""

    host: str
    port: int
    name: str


@dataclass(frozen=True)
class DiskGraph:
    """The live graph of one disk: which path nodes `disk<i>` currently uses."""

    index: int
    mode: Mode
    serial: int        # bumped for every new path node, keeps node names unique
    local: str | None  # node name of the local path in use
    remote: str | None  # node name of the NBD path in use
    quorum: str | None

    @property
    def top(self) -> str:
        return f"disk{self.index}"


def _name(index: int, kind: str, serial: int) -> str:
    return f"d{index}-{kind}{serial}"


# How a Level 2 copy's file is written: Linux AIO, submitted and completed in QEMU's event
# loop. The thread pool's hand-offs cost CPU the NBD transfer to the partner needs at the
# same moment (measured, 2 x 512 KiB writes + flush over quorum: 1.41-1.61 -> 1.16-1.42 ms
# per MiB; a lone image measured the same either way). Copies are always files on the host's
# own storage, opened O_DIRECT, which Linux AIO requires; levels 0/1 images, possibly on
# network file systems where io_submit can block, keep the thread pool.
COPY_AIO = "native"


def local_node(index: int, serial: int, image: LocalImage, locking: bool) -> tuple[str, dict[str, Any]]:
    name = _name(index, "local", serial)
    return name, file_image_node(name, image.path, image.format, locking, image.write_through, COPY_AIO)


def remote_node(index: int, serial: int, export: NbdTarget) -> tuple[str, dict[str, Any]]:
    """The partner's copy over NBD. QEMU's NBD client sends a guest flush to the partner
    (a round trip) whenever the server offers FLUSH, whatever `cache.no-flush` says, and
    quorum (7.2 to today) passes no FUA. qemu-storage-daemon always offers FLUSH; nbdkit
    with ftvm's filter (qemu/copy_server.py) does not, its writes being stable when
    answered: a guest's O_DSYNC write then costs one round trip to the partner, not two."""
    name = _name(index, "remote", serial)
    return name, {"driver": "nbd", "node-name": name, "export": export.name, "tls-creds": NBD_CLIENT,
                  "server": {"type": "inet", "host": export.host, "port": str(export.port)}}


def quorum_node(index: int, serial: int, children: list[str]) -> tuple[str, dict[str, Any]]:
    name = _name(index, "q", serial)
    return name, {"driver": "quorum", "node-name": name, "vote-threshold": 2,
                  "read-pattern": "fifo", "children": children}


def top_node(index: int, child: str) -> dict[str, Any]:
    return {"driver": "raw", "node-name": f"disk{index}", "file": child}


def image_node_name(index: int) -> str:
    return f"d{index}-img0"


def image_nodes(index: int, path: str, fmt: str) -> list[dict[str, Any]]:
    """Levels 0/1: the disk image (shared storage for level 1) under the same raw top node
    `disk<i>` as level 2, so an online level change can re-point `disk<i>` while the guest
    runs. O_DIRECT: a write the guest flushed is on the disk, not in the host's page cache."""
    name = image_node_name(index)
    return [{"driver": fmt, "node-name": name,
             "file": {"driver": "file", "node-name": name + "-f", "filename": path,
                      "cache": {"direct": True, "no-flush": False}, "aio": "threads"}},
            top_node(index, name)]


def file_image_node(name: str, path: str, fmt: str, locking: bool = True,
                    write_through: bool = False, aio: str = "threads") -> dict[str, Any]:
    """A node on an image file (a level 2 copy, or the target of an online move of a disk).
    A write-through file's node skips flushes: each write was already synchronous."""
    return {"driver": fmt, "node-name": name,
            "file": {"driver": "file", "node-name": name + "-f", "filename": path, "aio": aio,
                     "cache": {"direct": True, "no-flush": write_through}, "locking": "on" if locking else "off"}}


def local_only_start(index: int, image: LocalImage) -> tuple[DiskGraph, list[dict[str, Any]]]:
    """Blockdevs for the command line: every Level 2 VM starts on its local copy;
    the agent then brings the partner copy in (resync, then MIRRORED)."""
    local, spec = local_node(index, 0, image, locking=True)
    return (DiskGraph(index, Mode.LOCAL_ONLY, 1, local, None, None),
            [spec, top_node(index, local)])


def drop_child(g: DiskGraph, failed: str, image: LocalImage, export: NbdTarget) -> tuple[DiskGraph, list[QmpStep]]:
    """MIRRORED -> the surviving copy alone, `failed` being "local" or "remote".
    Run while the VM is stopped (it is: werror=stop)."""
    if g.mode is not Mode.MIRRORED or g.quorum is None or g.local is None or g.remote is None:
        raise ValueError(f"disk{g.index} is not mirrored")
    if failed not in ("local", "remote"):
        raise ValueError(f"unknown copy {failed!r}")
    survivor_kind = "remote" if failed == "local" else "local"

    def survivor_path(serial: int) -> tuple[str, dict[str, Any]]:
        if survivor_kind == "local":
            return local_node(g.index, serial, image, locking=False)
        return remote_node(g.index, serial, export)

    helper, helper_spec = survivor_path(g.serial)
    final, final_spec = survivor_path(g.serial + 1)
    failed_node = g.local if failed == "local" else g.remote
    failed_child = "children.0" if failed == "local" else "children.1"
    survivor_node = g.remote if failed == "local" else g.local
    steps: list[QmpStep] = [
        ("blockdev-add", helper_spec),
        ("x-blockdev-change", {"parent": g.quorum, "node": helper}),
        ("x-blockdev-change", {"parent": g.quorum, "child": failed_child}),
        ("blockdev-del", {"node-name": failed_node}),
        ("blockdev-add", final_spec),
        ("blockdev-reopen", {"options": [top_node(g.index, final)]}),
        ("blockdev-del", {"node-name": g.quorum}),
        ("blockdev-del", {"node-name": helper}),
        ("blockdev-del", {"node-name": survivor_node}),
    ]
    new = DiskGraph(g.index, Mode.REMOTE_ONLY if failed == "local" else Mode.LOCAL_ONLY, g.serial + 2,
                    final if survivor_kind == "local" else None,
                    final if survivor_kind == "remote" else None, None)
    return new, steps


def add_remote(g: DiskGraph, export: NbdTarget) -> tuple[DiskGraph, list[QmpStep], str]:
    """LOCAL_ONLY: connect the partner's export as a spare node (the resync target)."""
    if g.mode is not Mode.LOCAL_ONLY:
        raise ValueError(f"disk{g.index} is not local-only")
    name, spec = remote_node(g.index, g.serial, export)
    return replace(g, serial=g.serial + 1), [("blockdev-add", spec)], name


def mirror(g: DiskGraph, remote: str, image: LocalImage) -> tuple[DiskGraph, list[QmpStep]]:
    """LOCAL_ONLY with an in-sync spare NBD node -> MIRRORED. Run with the VM stopped,
    right after the last resync pass."""
    if g.mode is not Mode.LOCAL_ONLY or g.local is None:
        raise ValueError(f"disk{g.index} is not local-only")
    local, local_spec = local_node(g.index, g.serial, image, locking=False)
    return _to_quorum(g, local, remote, local_spec, g.local)


def node_kind(g: DiskGraph, node: str) -> str | None:
    """Which copy a node name (from QUORUM_REPORT_BAD) belongs to."""
    if node in (g.local, (g.local or "") + "-f"):
        return "local"
    if node == g.remote:
        return "remote"
    return None


def add_local(g: DiskGraph, image: LocalImage) -> tuple[DiskGraph, list[QmpStep], str]:
    """REMOTE_ONLY: a node on the (repaired) local copy, the target of its full resync."""
    if g.mode is not Mode.REMOTE_ONLY:
        raise ValueError(f"disk{g.index} is not remote-only")
    name, spec = local_node(g.index, g.serial, image, locking=False)
    return replace(g, serial=g.serial + 1), [("blockdev-add", spec)], name


def mirror_back(g: DiskGraph, local: str, export: NbdTarget) -> tuple[DiskGraph, list[QmpStep]]:
    """REMOTE_ONLY with an in-sync local node -> MIRRORED. Run with the VM stopped."""
    if g.mode is not Mode.REMOTE_ONLY or g.remote is None:
        raise ValueError(f"disk{g.index} is not remote-only")
    remote, remote_spec = remote_node(g.index, g.serial, export)
    return _to_quorum(g, local, remote, remote_spec, g.remote)


def _to_quorum(g: DiskGraph, local: str, remote: str, new_path: dict[str, Any],
               old_path: str) -> tuple[DiskGraph, list[QmpStep]]:
    """Add a new path to the copy the guest runs on (the other is the synced spare), put
    both under a quorum, point the top at it and drop the old single path."""
    quorum, quorum_spec = quorum_node(g.index, g.serial, [local, remote])
    steps: list[QmpStep] = [
        ("blockdev-add", new_path),
        ("blockdev-add", quorum_spec),
        ("blockdev-reopen", {"options": [top_node(g.index, quorum)]}),
        ("blockdev-del", {"node-name": old_path}),
    ]
    return DiskGraph(g.index, Mode.MIRRORED, g.serial + 1, local, remote, quorum), steps


def graph_of(index: int, block_graph: dict[str, Any]) -> DiskGraph | None:
    """Disk `index`'s level 2 graph as QEMU runs it now (`x-debug-query-block-graph`): what
    a new agent adopting a running VM starts from (agent/adoption.py). None: `disk<i>` is
    not a level 2 copy graph (levels 0/1, or not a graph ftvm made)."""
    names = {n["id"]: str(n.get("name", "")) for n in block_graph.get("nodes", [])}
    children: dict[str, dict[str, str]] = {}
    for e in block_graph.get("edges", []):
        children.setdefault(names.get(e["parent"], ""), {})[str(e["name"])] = names.get(e["child"], "")
    pattern = re.compile(rf"d{index}-(local|remote|q)(\d+)")
    serial = 1 + max((int(m.group(2)) for n in names.values() if (m := pattern.fullmatch(n))), default=0)
    top = children.get(f"disk{index}", {}).get("file", "")
    kind = pattern.fullmatch(top)
    if kind is None:
        return None
    if kind.group(1) == "local":
        return DiskGraph(index, Mode.LOCAL_ONLY, serial, top, None, None)
    if kind.group(1) == "remote":
        return DiskGraph(index, Mode.REMOTE_ONLY, serial, None, top, None)
    below = list(children.get(top, {}).values())
    local = next((n for n in below if n.startswith(f"d{index}-local")), None)
    remote = next((n for n in below if n.startswith(f"d{index}-remote")), None)
    if local is None or remote is None or len(below) != 2:
        return None
    return DiskGraph(index, Mode.MIRRORED, serial, local, remote, top)
