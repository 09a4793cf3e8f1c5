"""The Level 3 output-commit relay, with a real tap in a throwaway namespace and a
fake QEMU on its Unix socket (the framing QEMU's -netdev stream uses)."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from ftvm.l3.relay import OutputCommitRelay
from ftvm.qemu.process import open_tap


def frame(n: int) -> bytes:
    # broadcast destination, a made-up source, an experimental ethertype, a payload
    return b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x88\xb5" + n.to_bytes(4, "big") + b"\0" * 46


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.fail("needs root (a network namespace and a tap)")
    name = f"ftvm-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


def run_in_netns(ns: str, coro_fn) -> object:
    """Run an asyncio test body with this thread inside the namespace (tap created there)."""
    result: dict[str, object] = {}

    def body() -> None:
        import ctypes
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            result["error"] = OSError(ctypes.get_errno(), "setns")
            return
        os.close(fd)
        try:
            result["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    import threading
    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


async def _exercise(tmp: Path) -> dict[str, object]:
    tap = open_tap("ftr0")
    subprocess.run(["ip", "link", "set", "ftr0", "up"], check=True)
    relay = OutputCommitRelay(tmp / "net.sock", tap, gated=True)
    await relay.start()
    reader, writer = await asyncio.open_unix_connection(str(tmp / "net.sock"))
    relay.begin_epoch(1)
    for n in range(3):
        writer.write(struct.pack(">I", len(frame(n))) + frame(n))
    await writer.drain()
    await asyncio.sleep(0.1)
    held_before = len(relay.held)
    released_before = relay.stats.released
    relay.begin_epoch(2)
    writer.write(struct.pack(">I", len(frame(9))) + frame(9))
    await writer.drain()
    await asyncio.sleep(0.1)
    import socket
    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    capture.bind(("ftr0", 0))
    capture.setblocking(False)
    released_epoch1 = relay.release(1)
    await asyncio.sleep(0.1)
    seen = []
    while True:
        try:
            seen.append(capture.recv(2048)[:18])
        except BlockingIOError:
            break
    capture.close()
    still_held = len(relay.held)
    dropped = relay.discard()
    # toward the guest: a frame written into the tap comes out on the socket at once
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:  # the host transmits on the tap
        raw.bind(("ftr0", 0))
        raw.send(frame(42))
    inbound = b""
    while inbound != frame(42):  # the kernel's own IPv6 chatter on the new tap may come first
        header = await asyncio.wait_for(reader.readexactly(4), 2)
        inbound = await reader.readexactly(struct.unpack(">I", header)[0])
    writer.close()
    await relay.close()
    os.close(tap)
    return {"held_before": held_before, "released_before": released_before, "released_epoch1": released_epoch1,
            "still_held": still_held, "dropped": dropped, "inbound": inbound, "seen": seen,
            "log": list(relay.stats.release_log)}


def test_frames_leave_only_when_their_epoch_is_released(netns: str, tmp_path: Path) -> None:
    out = run_in_netns(netns, lambda: _exercise(tmp_path))
    assert isinstance(out, dict)
    assert out["held_before"] == 3 and out["released_before"] == 0  # nothing out before the ack
    assert out["released_epoch1"] == 3 and out["still_held"] == 1   # epoch 2 waits for its own
    assert out["seen"] == [frame(n)[:18] for n in range(3)]          # on the wire, in order
    assert out["dropped"] == 1                                       # failover: never sent
    assert [e for e, _ in out["log"]] == [1, 1, 1]
    assert out["inbound"] == frame(42)                               # toward the guest: straight through
