"""A fake QEMU for unit tests: a QMP server on a real Unix socket, in the test's event
loop, whose replies and events the test scripts (in the manner of Ganeti's fake
hypervisor), and a stand-in process (`sleep`) that dies when QEMU would: on `quit`, on a
guest power-off, on SIGKILL. The agent's own code (`QemuVm`, everything above it) talks
to it exactly as to QEMU. No root, no QEMU binary.

    fake = FakeQemu(tmp_path)
    fake.migrate_states = ["active", "active", "completed"]
    vm = await fake.start_vm(spec)
    ...
    await fake.close()
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftvm.core.model import VmSpec
from ftvm.qemu.cmdline import VmPaths
from ftvm.qemu.process import QemuVm

Handler = Callable[[dict[str, Any]], Any]


class QmpFault(Exception):
    """Raised by a handler: QEMU answers with this error."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls, self.desc = cls, desc


class FakeQemu:
    def __init__(self, run_dir: Path) -> None:
        self.paths = VmPaths(run_dir)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.status = "running"
        self.migrate_states: list[str] = ["completed"]  # query-migrate statuses, the last one repeats
        self.migrate_error = ""
        self.powers_off_after: float | None = 0.0  # system_powerdown: the guest powers off (None: ignores it)
        self.handlers: dict[str, Handler] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    # --- scripting -----------------------------------------------------------------------
    def on(self, cmd: str, handler: Handler) -> None:
        """Answer `cmd` with handler(arguments); a QmpFault it raises is QEMU's error reply."""
        self.handlers[cmd] = handler

    def fail(self, cmd: str, desc: str) -> None:
        def refuse(_: dict[str, Any]) -> Any:
            raise QmpFault(desc)
        self.on(cmd, refuse)

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        msg = {"event": event, "data": data or {},
               "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        for w in self._writers:
            w.write(json.dumps(msg).encode() + b"\r\n")

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls if c != "qmp_capabilities"]

    # --- life ----------------------------------------------------------------------------
    async def start_vm(self, spec: VmSpec,
                       on_event: Callable[[str, dict[str, Any]], None] | None = None) -> QemuVm:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, str(self.paths.qmp))
        self.proc = await asyncio.create_subprocess_exec("sleep", "3600")
        return await QemuVm.attach(spec, self.paths, self.proc, [], None, on_event)

    def exit(self) -> None:
        """The QEMU process ends (as after `quit` or a guest power-off)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def close(self) -> None:
        self.exit()
        if self.proc is not None:
            await self.proc.wait()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- the QMP server ----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
                            "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        try:
            async for req in _requests(reader):
                cmd, args = req["execute"], req.get("arguments", {})
                self.calls.append((cmd, args))
                try:
                    reply: dict[str, Any] = {"return": self._answer(cmd, args)}
                except QmpFault as e:
                    reply = {"error": {"class": e.cls, "desc": e.desc}}
                if "id" in req:
                    reply["id"] = req["id"]
                writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.remove(writer)

    def _answer(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd in self.handlers:
            return self.handlers[cmd](args)
        if cmd == "query-status":
            return {"status": self.status, "running": self.status == "running", "singlestep": False}
        if cmd in ("stop", "cont"):
            self.status = "paused" if cmd == "stop" else "running"
            self.emit("STOP" if cmd == "stop" else "RESUME")
            return {}
        if cmd == "quit":
            asyncio.get_running_loop().call_soon(self.exit)
            return {}
        if cmd == "system_powerdown":
            if self.powers_off_after is not None:
                asyncio.get_running_loop().call_later(self.powers_off_after, self.exit)
            return {}
        if cmd == "query-migrate":
            status = self.migrate_states.pop(0) if len(self.migrate_states) > 1 else self.migrate_states[0]
            if status == "completed" and "migrate" in self.commands():
                self.status = "postmigrate"  # a source's guest stays paused after a completed migration
            info: dict[str, Any] = {"status": status}
            if status in ("failed", "cancelled") and self.migrate_error:
                info["error-desc"] = self.migrate_error
            return info
        if cmd in ("qmp_capabilities", "migrate", "migrate-incoming", "migrate-set-parameters",
                   "migrate-set-capabilities", "announce-self", "migrate_cancel", "migrate-continue"):
            return {}
        raise QmpFault(f"The command {cmd} has not been found", "CommandNotFound")


async def _requests(reader: asyncio.StreamReader):  # type: ignore[no-untyped-def]
    """QMP requests as they come: JSON objects back to back, with or without newlines."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := await reader.read(65536):
        buf += chunk.decode()
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                obj, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buf = buf[end:]
            yield obj
