"""Level 3's checkpoint monitor client (qemu/monitor.py) against a real QEMU: commands,
QEMU's refusals as QmpError, the MIGRATION event a checkpoint waits for; and against a
peer that is not QEMU: a bad line ends the connection, never the caller's wait."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftvm.qemu.cmdline import listening_socket, monitor as monitor_args
from ftvm.qemu.monitor import MAX_LINE, DirectQmp
from ftvm.qemu.process import QemuError, QmpError


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[DirectQmp]:
    sock = tmp_path / "qmp-checkpoint.sock"
    log = tmp_path / "qemu.log"
    mon = listening_socket(sock)  # (non-blocking: see qemu/cmdline.monitor)
    with open(log, "wb") as err:  # a guestless QEMU, never started (-S)
        proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "32", "-nodefaults",
                                 "-display", "none", "-S", *monitor_args(sock, "m", mon, wait=True)],
                                stderr=err, pass_fds=[mon])
    os.close(mon)
    qmp = DirectQmp(sock)
    try:
        while True:  # until QEMU listens (it may be slow to start on a loaded machine)
            if proc.poll() is not None:
                raise AssertionError(log.read_text())
            try:
                await qmp.connect()
                break
            except QemuError:
                await asyncio.sleep(0.05)
        yield qmp
    finally:
        await qmp.close()
        proc.kill()
        proc.wait()


async def test_commands_answer_and_refusals_raise(monitor: DirectQmp) -> None:
    status = await monitor.execute("query-status")
    assert status["status"] == "prelaunch" and status["running"] is False
    with pytest.raises(QmpError, match="no-such-command"):
        await monitor.execute("no-such-command")
    with pytest.raises(QmpError):
        await monitor.execute("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]})
    assert (await monitor.execute("query-status"))["status"] == "prelaunch"  # still usable after refusals


async def test_the_migration_event_ends_a_device_state_save(monitor: DirectQmp, tmp_path: Path) -> None:
    await monitor.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    done = monitor.expect("MIGRATION", lambda d: d.get("status") == "completed")
    unrelated = monitor.expect("SHUTDOWN")
    out = tmp_path / "state"
    await monitor.execute("migrate", {"uri": f"exec:cat > {out}"})
    assert (await asyncio.wait_for(done, 60))["status"] == "completed"
    assert out.stat().st_size > 0 and (await monitor.execute("query-migrate"))["status"] == "completed"
    assert not unrelated.done()
    await monitor.close()
    assert unrelated.cancelled()  # a waiter nobody will serve is not left pending
    with pytest.raises(QmpError, match="closed"):
        await monitor.execute("query-status")


async def test_the_device_state_pipe_carries_a_whole_save_without_a_connection(monitor: DirectQmp) -> None:
    """`getfd` over the checkpoint monitor (the descriptor passed with SCM_RIGHTS), then
    `migrate fd:`: the device state arrives through the pipe, and a second one needs a new
    descriptor (QEMU takes the first with the migration)."""
    from ftvm.l3.primary import DeviceStatePipe
    await monitor.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    pipe = DeviceStatePipe(monitor)
    for _ in range(2):
        await pipe.arm()
        assert pipe.armed
        done = monitor.expect("MIGRATION", lambda d: d.get("status") == "completed")
        state = asyncio.ensure_future(pipe.read())
        await monitor.execute("migrate", {"uri": f"fd:{DeviceStatePipe.NAME}"})
        await asyncio.wait_for(done, 60)
        data = await asyncio.wait_for(state, 60)
        assert data.startswith(b"QEVM") and len(data) > 1000 and not pipe.armed  # QEMU's stream magic
        await monitor.execute("cont")  # (as a checkpoint does: from postmigrate)
        await monitor.execute("stop")
    with pytest.raises(QmpError, match="ftvm-devstate"):  # used up with the migration
        await monitor.execute("migrate", {"uri": f"fd:{DeviceStatePipe.NAME}"})
    await pipe.arm()
    pipe.close()  # (a session that ends with a pipe handed over: nothing left on our side)
    assert not pipe.armed


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"{not json\n", b"x" * (MAX_LINE + 10) + b"\n", b"[" * 100_000 + b"\n"])
async def test_a_peer_that_is_not_qemu_ends_the_connection_not_the_caller(tmp_path: Path, line: bytes) -> None:
    sock = tmp_path / "fake.sock"
    answered = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        await reader.readline()  # qmp_capabilities
        writer.write(b'{"return": {}, "id": 1}\n')
        await reader.readline()  # the test's command: answered with garbage
        writer.write(line)
        await writer.drain()
        answered.set()
        await reader.read()

    server = await asyncio.start_unix_server(serve, path=str(sock))
    qmp = DirectQmp(sock)
    try:
        await qmp.connect()
        event = qmp.expect("MIGRATION")
        with pytest.raises(QmpError):
            await asyncio.wait_for(qmp.execute("query-status"), 30)
        with pytest.raises(QemuError):
            await asyncio.wait_for(event, 30)
        with pytest.raises(QmpError):  # and every later command fails at once
            await qmp.execute("stop")
        assert answered.is_set()
    finally:
        await qmp.close()
        server.close()
        await server.wait_closed()


async def test_a_reader_cancelled_with_the_loop_fails_the_replies_still_awaited(monitor: DirectQmp) -> None:
    """An ending agent cancels every task at once, the monitor's reader among them. A
    checkpoint cancelled at the same moment awaits its commands' replies on its way out;
    they must fail, not wait forever (an agent leaving with SIGUSR2 once hung there)."""
    await monitor.execute("stop")
    waiting = monitor.expect("RESUME")  # (never comes: the guest is not resumed)
    reader = monitor._task
    assert reader is not None
    reader.cancel()
    await asyncio.wait({reader})
    with pytest.raises(QemuError, match="closed"):
        await asyncio.wait_for(waiting, 30)
    with pytest.raises(QmpError, match="closed"):
        await monitor.execute("query-status")


async def test_close_passes_on_the_cancellation_of_its_caller(tmp_path: Path) -> None:
    """`close` waits for the reader; a caller cancelled meanwhile stays cancelled."""
    sock = tmp_path / "slow.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        await reader.readline()
        writer.write(b'{"return": {}, "id": 1}\n')
        await reader.read()

    server = await asyncio.start_unix_server(serve, path=str(sock))
    qmp = DirectQmp(sock)
    try:
        await qmp.connect()
        closing = asyncio.ensure_future(qmp.close())
        await asyncio.sleep(0)  # (now in close, waiting for the reader)
        closing.cancel()
        await asyncio.wait({closing})
        assert closing.cancelled()
    finally:
        await qmp.close()
        server.close()
        await server.wait_closed()
