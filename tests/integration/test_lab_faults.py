"""The lab's storage faults (lab/faults.py) against a real QEMU: a level 2 local copy made
to fail with EIO and made to work again (a transient failure), and a guest disk made slow
and fast again. The campaign relies on both being undone cleanly."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ftvm.lab import faults
from ftvm.qemu.cmdline import listening_socket, monitor as monitor_args


@pytest.fixture
async def qmp_sock(tmp_path: Path) -> AsyncIterator[Path]:
    """A guestless QEMU (-S) with one disk laid out as a level 2 local copy is
    (`d0-local1` over its file node `d0-local1-f`), on device `vd0`."""
    image = tmp_path / "d0.raw"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    sock = tmp_path / "qmp-debug.sock"
    mon = listening_socket(sock)
    node = {"driver": "raw", "node-name": "d0-local1",
            "file": {"driver": "file", "node-name": "d0-local1-f", "filename": str(image), "aio": "native",
                     "cache": {"direct": True, "no-flush": True}}}
    with open(tmp_path / "qemu.log", "wb") as err:
        proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "32", "-nodefaults",
                                 "-display", "none", "-S", *monitor_args(sock, "m", mon, wait=False),
                                 "-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=d0-local1,id=vd0"],
                                stdout=err, stderr=err, pass_fds=[mon])
    os.close(mon)
    try:
        yield sock
    finally:
        proc.kill()
        proc.wait()


async def _io(sock: Path, command: str) -> str:
    """One request through the guest's device (HMP's qemu-io), and what it said: qemu-io
    writes to QEMU's output ("wrote 4096/4096 bytes ...", or "write failed: ...")."""
    log = sock.parent / "qemu.log"
    before = log.stat().st_size
    qmp = QMPClient("test")
    await qmp.connect(str(sock))
    try:
        await qmp.execute("human-monitor-command",
                          {"command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend "{command}"'})
    finally:
        await qmp.disconnect()
    return log.read_bytes()[before:].decode(errors="replace")


async def test_a_failed_local_copy_fails_every_request_until_the_failure_is_cleared(qmp_sock: Path) -> None:
    assert "wrote 4096/4096" in await _io(qmp_sock, "write 0 4k")
    failed = await faults._inject_disk_failure(qmp_sock, "t")
    assert failed and failed[0].startswith("d0-local1 ")
    assert "write failed: Input/output error" in await _io(qmp_sock, "write 0 4k")
    assert "read failed: Input/output error" in await _io(qmp_sock, "read 0 4k")
    assert await faults._clear_disk_failure(qmp_sock, "t") == ["d0-local1"]
    assert "wrote 4096/4096" in await _io(qmp_sock, "write 0 4k")
    assert "read 4096/4096" in await _io(qmp_sock, "read 0 4k")
    assert await faults._clear_disk_failure(qmp_sock, "t") == []  # (nothing left to clear)


async def test_a_slow_disk_is_throttled_then_fast_again(qmp_sock: Path) -> None:
    async def limits() -> list[tuple[int, int]]:
        qmp = QMPClient("test")
        await qmp.connect(str(qmp_sock))
        try:
            return [(b["inserted"]["bps"], b["inserted"]["iops"]) for b in await qmp.execute("query-block")]
        finally:
            await qmp.disconnect()
    assert await limits() == [(0, 0)]
    assert len(await faults._throttle(qmp_sock, "t", faults.SLOW_BPS, faults.SLOW_IOPS)) == 1
    assert await limits() == [(faults.SLOW_BPS, faults.SLOW_IOPS)]
    await faults._throttle(qmp_sock, "t", 0, 0)
    assert await limits() == [(0, 0)]
