"""A level 2 disk's graph as QEMU runs it (`x-debug-query-block-graph`), read back by an
agent adopting a running VM (qemu/blockgraph.graph_of)."""

from __future__ import annotations

from typing import Any

from ftvm.qemu.blockgraph import DiskGraph, Mode, graph_of


def _graph(*edges: tuple[str, str, str], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    names = sorted({n for p, _, c in edges for n in (p, c)} | set(extra))
    ids = {n: i for i, n in enumerate(names)}
    return {"nodes": [{"id": i, "name": n, "type": "block-driver"} for n, i in ids.items()],
            "edges": [{"parent": ids[p], "name": name, "child": ids[c]} for p, name, c in edges]}


def test_mirrored() -> None:
    g = _graph(("disk0", "file", "d0-q3"), ("d0-q3", "children.0", "d0-local1"),
               ("d0-q3", "children.1", "d0-remote2"), ("d0-local1", "file", "d0-local1-f"))
    assert graph_of(0, g) == DiskGraph(0, Mode.MIRRORED, 4, "d0-local1", "d0-remote2", "d0-q3")


def test_local_only_with_a_spare_left_by_a_resync() -> None:
    """The serial goes past every node named for the disk: new nodes never reuse a name."""
    g = _graph(("disk1", "file", "d1-local4"), ("d1-local4", "file", "d1-local4-f"), extra=("d1-remote7",))
    assert graph_of(1, g) == DiskGraph(1, Mode.LOCAL_ONLY, 8, "d1-local4", None, None)


def test_remote_only() -> None:
    assert graph_of(0, _graph(("disk0", "file", "d0-remote5"))) == DiskGraph(0, Mode.REMOTE_ONLY, 6, None,
                                                                             "d0-remote5", None)


def test_not_a_level_2_graph() -> None:
    assert graph_of(0, _graph(("disk0", "file", "d0-img0"), ("d0-img0", "file", "d0-img0-f"))) is None
    assert graph_of(0, _graph(("disk1", "file", "d1-local1"))) is None  # no disk0
    assert graph_of(0, _graph(("disk0", "file", "d0-q2"), ("d0-q2", "children.0", "d0-local1"))) is None
    assert graph_of(0, {}) is None
