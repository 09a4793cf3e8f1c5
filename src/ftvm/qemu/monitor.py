"""A second QMP monitor for level 3's checkpoint path: one JSON line per message, nothing else.

A checkpoint issues five to seven QMP commands with the guest stopped. Through the agent's
general QMP client (qemu.qmp) each costs about 0.2 ms more than the bare round trip on this
machine (measured: query-status 0.31 ms against 0.10 ms), over a millisecond of every
pause. A checkpointed QEMU therefore gets a monitor of its own (cmdline.py), which this
client speaks to directly. It also waits for events (`expect`), so the end of the device
state save is QEMU's MIGRATION event rather than a `query-migrate` poll.

Everything read is bounded: a line longer than MAX_LINE, or one that is not a JSON object,
ends the connection (QemuError) instead of growing a buffer.
"""

from __future__ import annotations

import array
import asyncio
import json
import socket
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from .process import QemuError, QmpError

MAX_LINE = 1 << 20       # the checkpoint's commands answer in a few hundred bytes
CONNECT_S = 2.0

EventMatch = Callable[[dict[str, Any]], bool]


class DirectQmp:
    """`execute` and `expect` over one QMP socket; `connect` first, `close` at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._waiters: list[tuple[str, EventMatch, asyncio.Future[dict[str, Any]]]] = []
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None
        self._error: QemuError | None = None
        self._sock: socket.socket | None = None

    async def connect(self) -> None:
        """QemuError if the monitor does not answer like QEMU's."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, str(self.path)), CONNECT_S)
            reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
            self._sock = sock  # kept for `execute_with_fd` (SCM_RIGHTS, which the transport cannot send)
            self._reader = reader
            greeting = await asyncio.wait_for(reader.readline(), CONNECT_S)
        except (OSError, TimeoutError, ValueError) as e:
            sock.close()
            raise QemuError(f"checkpoint monitor {self.path.name}: {e or type(e).__name__}") from e
        if b'"QMP"' not in greeting:
            raise QemuError(f"checkpoint monitor {self.path.name}: no QMP greeting")
        self._task = asyncio.create_task(self._read(), name=f"qmp-{self.path.name}")
        await self.execute("qmp_capabilities")

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One command's `return`; QmpError if QEMU refuses it or the connection is gone.
        The command is written before the first await: commands issued one after the other
        (as tasks) reach QEMU in that order without waiting for each other's replies."""
        return await self._execute(cmd, args, None)

    async def execute_with_fd(self, cmd: str, args: dict[str, Any] | None, fd: int) -> Any:
        """`execute`, with `fd` passed along (SCM_RIGHTS), as `getfd` needs."""
        if self._writer is not None and self._writer.transport.get_write_buffer_size():
            await self._writer.drain()  # (nothing may overtake what is queued)
        return await self._execute(cmd, args, fd)

    async def _execute(self, cmd: str, args: dict[str, Any] | None, fd: int | None) -> Any:
        if self._writer is None or self._sock is None or self._error is not None:
            raise QmpError(cmd, str(self._error or "checkpoint monitor not connected"))
        self._next_id += 1
        ident = self._next_id
        msg: dict[str, Any] = {"execute": cmd, "id": ident}
        if args:
            msg["arguments"] = args
        line = json.dumps(msg).encode() + b"\n"
        reply = asyncio.get_running_loop().create_future()
        self._pending[ident] = reply
        try:
            if fd is None:
                self._writer.write(line)
            else:
                try:
                    sent = self._sock.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                except OSError as e:  # (a full socket buffer included: never the case for one short line)
                    raise QmpError(cmd, f"could not pass a descriptor: {e}") from e
                if sent != len(line):
                    self._fail(QemuError(f"checkpoint monitor: {cmd} written in part"))
                    raise QmpError(cmd, "written in part: the monitor connection is ended")
            result = await reply
        finally:
            self._pending.pop(ident, None)
        if isinstance(result, QemuError):
            raise QmpError(cmd, str(result))
        if "error" in result:
            err = result["error"] if isinstance(result["error"], dict) else {}
            raise QmpError(cmd, str(err.get("desc", "error")), err.get("class"))
        return result.get("return")

    def expect(self, event: str, match: EventMatch = lambda data: True) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `event` whose data `match`es, from now on (call it before the
        command that causes the event). It fails with QemuError if the connection ends first."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self._error is not None:
            fut.set_exception(self._error)
        else:
            self._waiters.append((event, match, fut))
        return fut

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    raise QemuError("QEMU closed the checkpoint monitor")
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise QemuError("checkpoint monitor sent a message that is not a JSON object")
                if "event" in msg:
                    self._deliver(msg)
                elif (reply := self._pending.get(msg.get("id"))) is not None and not reply.done():  # type: ignore[arg-type]
                    reply.set_result(msg)
        except (OSError, ValueError, RecursionError, QemuError) as e:  # bad JSON, a line over MAX_LINE
            self._fail(e if isinstance(e, QemuError) else QemuError(f"checkpoint monitor: {e}"))
        except asyncio.CancelledError:
            # nothing reads replies any more: whoever waits on one must learn it now (a
            # checkpoint cancelled with the rest waits on its commands' replies on its way out)
            self._fail(QemuError("checkpoint monitor closed"))
            raise

    def _deliver(self, msg: dict[str, Any]) -> None:
        raw = msg.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        for waiter in list(self._waiters):
            name, match, fut = waiter
            if fut.done():
                self._waiters.remove(waiter)  # given up on (cancelled)
            elif name == msg["event"] and match(data):
                self._waiters.remove(waiter)
                fut.set_result(data)

    def _fail(self, error: QemuError) -> None:
        self._error = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(error)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()

    async def close(self) -> None:
        for _, _, fut in self._waiters:  # nobody waits on these any more
            fut.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # (not `await` itself: that would swallow our own cancellation)
        self._fail(QemuError("checkpoint monitor closed"))
        if self._writer is not None:
            self._writer.close()
            with suppress(OSError):
                await self._writer.wait_closed()
