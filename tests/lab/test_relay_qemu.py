"""The Level 3 output-commit relay with a real QEMU (-netdev stream) in a lab host:
while its epochs are not released nothing the guest sends reaches the LAN; released,
the ledger answers the lab client."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import threading
from pathlib import Path

import pytest

from ftvm.l3.relay import OutputCommitRelay
from ftvm.qemu.process import open_tap
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabPool, ScenarioError

pytestmark = pytest.mark.lab
IP = "10.77.0.151"


def test_guest_output_leaves_only_when_released(lab: labmod.LabState, guest_image, tmp_path: Path) -> None:
    disk = tmp_path / "relay.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    sock = tmp_path / "net.sock"
    phase = {"release": False, "stop": False}
    stats: dict[str, object] = {}
    ready = threading.Event()

    async def host_side() -> None:
        tap = open_tap("ftrly")
        subprocess.run(["ip", "link", "set", "ftrly", "master", "br0", "up"], check=True)
        relay = OutputCommitRelay(sock, tap, gated=True)
        await relay.start()
        qemu = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
            "-kernel", str(guest_image.kernel), "-initrd", str(guest_image.initrd),
            "-append", f"{guest_image.append} ftvm.ip={IP}/24",
            "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
            "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:77:01:51,romfile=",
            "-serial", f"file:{tmp_path / 'serial.log'}")
        ready.set()
        epoch = 0
        try:
            while not phase["stop"]:
                await asyncio.sleep(0.05)
                epoch += 1
                relay.begin_epoch(epoch)       # a checkpoint boundary every 50 ms
                if phase["release"]:
                    relay.release(epoch - 1)   # ... acknowledged by the partner
            stats.update(held_max=relay.stats.held_max, released=relay.stats.released,
                         from_guest=relay.stats.from_guest)
        finally:
            qemu.kill()
            await qemu.wait()
            await relay.close()
            os.close(tap)

    def thread_body() -> None:
        fd = os.open(f"/run/netns/{topo.host_ns('h1')}", os.O_RDONLY)
        assert ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, 0x40000000) == 0
        os.close(fd)
        try:
            asyncio.run(host_side())
        except BaseException as e:
            stats["error"] = e

    t = threading.Thread(target=thread_body, daemon=True)
    t.start()
    pool = LabPool(lab)
    try:
        assert ready.wait(30)
        deadline = 10.0  # the guest boots in ~4 s: several seconds of gated output
        with pytest.raises(ScenarioError):  # booted but gated: not one answer gets out
            pool.wait_answering(IP, deadline)
        phase["release"] = True
        pool.wait_answering(IP, 60)
        assert pool.ask(IP, "W through-the-relay").startswith("OK 1 ")
    finally:
        phase["stop"] = True
        t.join(30)
    assert "error" not in stats, stats.get("error")
    assert stats["from_guest"] > 0 and stats["held_max"] > 0 and stats["released"] > 0
    assert "ftvm-ledger ready" in (tmp_path / "serial.log").read_text()
