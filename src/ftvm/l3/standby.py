"""Level 3, partner side: keep a replica of a VM's RAM and disks at its last committed checkpoint.

The replica files are the very files the partner's QEMU will use if it takes
over: the RAM file (`memory-backend-file`) and the raw disk images, plus the
device state of the last committed checkpoint. A checkpoint is applied only
after its whole message arrived (commit), then acknowledged; a partial one is
never applied. A HELLO starts a new session: the replica is invalid
(`committed` None) until that session's first checkpoint commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .pages import ReplicaFile
from .wire import Msg, WireError, decode_checkpoint, decode_precopy, encode_ack, encode_heartbeat, \
    read_message, write_message

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1


@dataclass(frozen=True)
class ReplicaPaths:
    ram: Path
    disks: tuple[Path, ...]
    device_state: Path   # last committed device state
    meta: Path           # {"session", "epoch"} of the committed checkpoint

    @property
    def files(self) -> list[Path]:
        return [self.ram, *self.disks]


RAM_DIR_MARKER = ".ftvm-guest-ram"


def make_guest_ram_dir(ram_file: Path) -> None:
    """The directory of a level 3 RAM file, private (0700), marked as ftvm's: the agent's
    clean-up of stale RAM files removes only marked directories."""
    d = ram_file.parent
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    (d / RAM_DIR_MARKER).touch(mode=0o600, exist_ok=True)


@dataclass(frozen=True)
class Committed:
    session: str
    epoch: int
    at: float  # monotonic time of the commit


def read_committed(paths: ReplicaPaths) -> tuple[str, int] | None:
    """The session and epoch of the checkpoint the replica files hold, if any."""
    try:
        meta = json.loads(paths.meta.read_text())
        return str(meta["session"]), int(meta["epoch"])
    except (OSError, ValueError, KeyError):
        return None


class Standby:
    """One VM's replica on the partner, fed by one connection at a time."""

    def __init__(self, vm: str, paths: ReplicaPaths, on_change: Callable[[], None] | None = None) -> None:
        self.vm = vm
        self.paths = paths
        self.on_change = on_change
        self.session: str | None = None
        self.committed: Committed | None = None
        self.last_heard = 0.0
        self.connected = False
        self.bytes_received = 0
        self.primary_addr = ""
        self._frozen = False  # a takeover began: nothing more is applied or acknowledged
        self._commit_lock = asyncio.Lock()

    async def freeze(self) -> tuple[str, int] | None:
        """Stop applying and acknowledging (before a takeover). Waits for a commit under
        way, then returns the (session, epoch) the replica files hold, if any."""
        async with self._commit_lock:
            self._frozen = True
            return read_committed(self.paths) if self.committed is not None else None

    def thaw(self) -> None:
        self._frozen = False

    async def serve(self, hello: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one session from its HELLO until the connection ends."""
        files = hello["files"]
        if len(files) != len(self.paths.files):
            raise WireError(f"primary sends {len(files)} files, this replica has {len(self.paths.files)}")
        self.session, self.committed = str(hello["session"]), None
        self.paths.meta.parent.mkdir(parents=True, exist_ok=True)
        self.paths.device_state.parent.mkdir(parents=True, exist_ok=True)
        self.paths.meta.unlink(missing_ok=True)  # the files stop describing any checkpoint now
        make_guest_ram_dir(self.paths.ram)
        replicas = [ReplicaFile(p, int(f["size"])) for p, f in zip(self.paths.files, files, strict=True)]
        for r in replicas:
            await asyncio.to_thread(r.zero)
        self.connected, self.last_heard = True, time.monotonic()
        self.primary_addr = str(writer.get_extra_info("peername"))
        beat = asyncio.create_task(self._heartbeats(writer))
        try:
            while True:
                kind, payload = await read_message(reader, self._heard)
                self._heard()
                self.bytes_received += len(payload)
                if self._frozen:
                    continue
                if kind is Msg.PRECOPY:
                    index, delta = decode_precopy(payload)
                    await asyncio.to_thread(replicas[index].apply, delta)
                elif kind is Msg.CHECKPOINT:
                    cp = decode_checkpoint(payload)
                    async with self._commit_lock:
                        if self._frozen:
                            continue
                        await asyncio.to_thread(self._commit, replicas, cp.deltas, cp.device_state, cp.epoch)
                        self.committed = Committed(self.session, cp.epoch, time.monotonic())
                        write_message(writer, encode_ack(cp.epoch))
                    if cp.epoch == 1 and self.on_change:
                        self.on_change()
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            log.info("%s: checkpoint link closed (%s: %s)", self.vm, type(e).__name__, e)
        finally:
            beat.cancel()
            self.connected = False
            for r in replicas:
                r.close()
            writer.close()
            if self.on_change:
                self.on_change()

    def _commit(self, replicas: list[ReplicaFile], deltas: dict, device_state: bytes, epoch: int) -> None:
        for index, delta in deltas.items():
            replicas[index].apply(delta)
        tmp = self.paths.device_state.with_suffix(".tmp")
        tmp.write_bytes(device_state)
        os.replace(tmp, self.paths.device_state)
        meta = self.paths.meta.with_suffix(".tmp")
        meta.write_text(json.dumps({"session": self.session, "epoch": epoch}))
        os.replace(meta, self.paths.meta)

    async def _heartbeats(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self._frozen:
                continue  # a partner taking over goes silent: the primary stops releasing output
            write_message(writer, encode_heartbeat())
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return

    def _heard(self) -> None:
        self.last_heard = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard if self.last_heard else float("inf")


class StandbyServer:
    """The partner agent's listener for every Level 3 VM it protects (on its replication address).
    `lookup(vm, peer)` returns the VM's Standby if this host is its partner, else None."""

    def __init__(self, addr: str, port: int, lookup: Callable[[str], Standby | None]) -> None:
        self.addr, self.port, self.lookup = addr, port, lookup
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.addr, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import socket
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            kind, payload = await asyncio.wait_for(read_message(reader), 5.0)
            if kind is not Msg.HELLO:
                raise WireError("the first message must be HELLO")
            hello = json.loads(payload)
            standby = self.lookup(str(hello["vm"]))
            if standby is None:
                raise WireError(f"not a partner of VM {hello['vm']!r} here")
            await standby.serve(hello, reader, writer)
        except (WireError, ValueError, KeyError, TimeoutError, asyncio.IncompleteReadError, OSError) as e:
            log.warning("refused a checkpoint connection: %s", e)
            writer.close()
