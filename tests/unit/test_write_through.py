"""Write-through copies: the file attribute that lets a copy's nodes skip flushes, and the
block nodes and storage-daemon command lines that follow it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ftvm.qemu.blockgraph import LocalImage, NbdTarget, drop_child, local_only_start, mirror
from ftvm.qemu.storage_daemon import build_qsd_cmdline, restore_write_through, writable_copy
from ftvm.qemu.writethrough import is_write_through, make_write_through

@pytest.fixture
def copy_file(tmp_path: Path) -> Path:
    """A file where the lab tests keep their level 2 copies (pytest's temporary directory):
    the file system those tests exercise write-through on."""
    path = tmp_path / "disk0.img"
    path.write_bytes(b"\0" * 65536)
    return path


def test_the_attribute_is_set_and_read_back(copy_file: Path) -> None:
    assert not is_write_through(str(copy_file))
    assert make_write_through(str(copy_file))
    assert is_write_through(str(copy_file))
    assert "S" in subprocess.run(["lsattr", str(copy_file)], capture_output=True, text=True).stdout.split()[0]


def test_a_file_system_without_it_keeps_ordinary_flushes() -> None:
    path = Path("/dev/shm/ftvm-unit-write-through")  # tmpfs keeps no such attribute
    path.write_bytes(b"\0" * 4096)
    try:
        image = writable_copy(LocalImage(str(path), "raw"), want_write_through=True)
        assert not image.write_through and not is_write_through(str(path))
    finally:
        path.unlink()


def test_writable_copy_follows_the_hosts_choice(copy_file: Path) -> None:
    off = writable_copy(LocalImage(str(copy_file), "raw"), want_write_through=False)
    assert not off.write_through and not is_write_through(str(copy_file))
    on = writable_copy(LocalImage(str(copy_file), "raw"), want_write_through=True)
    assert on.write_through and is_write_through(str(copy_file))
    # turned off again (host.toml): the file writes as usual again
    off = writable_copy(LocalImage(str(copy_file), "raw"), want_write_through=False)
    assert not off.write_through and not is_write_through(str(copy_file))


def test_a_cleared_attribute_is_set_again(copy_file: Path) -> None:
    image = writable_copy(LocalImage(str(copy_file), "raw"), want_write_through=True)
    assert restore_write_through([image]) == []
    subprocess.run(["chattr", "-S", str(copy_file)], check=True)
    assert restore_write_through([image]) == [str(copy_file)]
    assert is_write_through(str(copy_file))
    # a copy that is not write-through is left alone
    subprocess.run(["chattr", "-S", str(copy_file)], check=True)
    assert restore_write_through([LocalImage(str(copy_file), "raw")]) == []
    assert not is_write_through(str(copy_file))


def _no_flush(node: dict) -> bool:
    return bool(node["file"]["cache"]["no-flush"])


@pytest.mark.parametrize("write_through", [True, False])
def test_every_node_on_a_copy_skips_flushes_only_if_write_through(write_through: bool) -> None:
    image = LocalImage("/l/disk0.img", "qcow2", write_through=write_through)
    export = NbdTarget("10.79.0.2", 10809, "web-d0")
    g, nodes = local_only_start(0, image)
    assert _no_flush(nodes[0]) is write_through
    g, steps = mirror(g, "d0-remote9", image)
    added = [args for cmd, args in steps if cmd == "blockdev-add" and args["driver"] == "qcow2"]
    assert added and all(_no_flush(a) is write_through for a in added)
    _, steps = drop_child(g, "remote", image, export)
    survivors = [args for cmd, args in steps if cmd == "blockdev-add"]
    assert len(survivors) == 2 and all(_no_flush(a) is write_through for a in survivors)


def test_the_storage_daemon_skips_fdatasync_only_on_write_through_copies() -> None:
    cmd = build_qsd_cmdline("web", [LocalImage("/l/a.img", "raw", write_through=True),
                                    LocalImage("/l/b.img", "raw")], "addr.type=fd,addr.str=3,tls-creds=ftvm-nbd-in",
                            Path("/run/tls"))
    files = [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "--blockdev"
             and json.loads(cmd[i + 1])["driver"] == "file"]
    assert [f["cache"]["no-flush"] for f in files] == [True, False]
    assert all(f["cache"]["direct"] for f in files)
    assert "addr.type=fd,addr.str=3,tls-creds=ftvm-nbd-in" in cmd  # only holders of the NBD key get in
    assert any(a.startswith("tls-creds-psk,id=ftvm-nbd-in,") for a in cmd)
