"""Level 3, partner side: keep a replica of a VM's RAM and disks at its last committed checkpoint.

The replica files are the very files the partner's QEMU will use if it takes
over: the RAM file (`memory-backend-file`) and the raw disk images, plus the
device state of the last committed checkpoint. A checkpoint is applied only
after its whole message arrived (commit), then acknowledged; a partial one is
never applied. An authenticated HELLO (l3/channel.py) starts a new session: the replica
is invalid (`committed` None) until that session's first checkpoint commits. Nothing in
the files changes before the primary has proved it holds the pool's key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .channel import Channel, accept_session, read_hello, refuse
from .pages import PAGE, Delta, ReplicaFile
from .stalls import STALLS
from .wire import (Checkpoint, Msg, StatePatch, WireError, decode_checkpoint, decode_precopy, encode_ack,
                   encode_heartbeat, standby_limits)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.025  # as the primary's (l3/primary.py)
INLINE_COMMIT = 2 << 20  # a checkpoint smaller than this is applied on the event loop
READER_LIMIT = 4 << 20   # the checkpoint link's read buffer (not a bound: message sizes are)


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


def _replace_private(path: Path, data: bytes) -> None:
    """Write `path` whole (a reader sees the old file or the new one), readable only by the
    agent: the device state is the guest's."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
        self.dropped = 0  # pre-copies and checkpoints received while frozen, not applied
        self.protected_at: float | None = None  # monotonic time this session's first checkpoint committed
        self._frozen = False  # a takeover began: nothing more is applied or acknowledged
        self._applying = False  # applying a received pre-copy or checkpoint (see silent_for)
        self._commit_lock = asyncio.Lock()
        self._starting = False  # a new session's handshake is under way
        self._channel: Channel | None = None
        self._session_done = asyncio.Event()
        # The committed checkpoint's device state is kept here and written to disk (with its
        # record, `meta`) only when a start may use it: at a freeze, at the end of a session,
        # when the VM starts here. Written every epoch, the two renames cost the ACK ~2 ms
        # (ext4 flushes a file replaced by rename). The RAM replica it goes with is in tmpfs:
        # on disk the state lasts no longer than what it describes.
        self._state: bytes | None = None
        self._persisted = False  # meta and device state on disk describe `committed`
        self._torn = False       # an apply did not finish: the files describe no checkpoint
        # Called with (file index, page numbers) before those pages of a replica file are
        # written (a DR point cut from this replica keeps what they held: dr/standby_capture.py).
        self.before_write: list[Callable[[int, np.ndarray], None]] = []

    async def freeze(self) -> tuple[str, int] | None:
        """Stop applying and acknowledging (before a takeover). Waits for a commit under
        way, writes the committed checkpoint's state and record, and returns the (session,
        epoch) the replica files hold, if any."""
        async with self._commit_lock:
            self._frozen = True
            self._persist()
            return read_committed(self.paths) if self.committed is not None else None

    def release_files(self) -> None:
        """The VM starts on these files here: nothing more is applied; the last commit is
        written for the start to resume from, unless an apply is under way (then none is)."""
        self._frozen = True
        if self._applying:
            self._torn = True
        self._persist()

    def _persist(self) -> None:
        if self.committed is None or self._state is None or self._torn or self._persisted:
            return
        try:
            _replace_private(self.paths.device_state, self._state)
            _replace_private(self.paths.meta, json.dumps({"session": self.session,
                                                          "epoch": self.committed.epoch}).encode())
        except OSError as e:  # no record: nothing will resume from these files (a cold boot)
            log.warning("%s: the committed checkpoint could not be written: %s", self.vm, e)
            with suppress(OSError):
                self.paths.meta.unlink(missing_ok=True)
            return
        self._persisted = True

    def thaw(self) -> None:
        self._frozen = False

    def live(self, within: float) -> bool:
        """A session is connected and was heard from in the last `within` seconds (or one is
        being set up): a second one is refused meanwhile."""
        return self._starting or (self.connected and self.silent_for() < within)

    def begin_handshake(self) -> None:
        self._starting = True

    def end_handshake(self) -> None:
        self._starting = False

    async def end_stale_session(self) -> None:
        """A new, authenticated session replaces one its primary no longer feeds (a link cut
        leaves the old connection half open): close the old one and wait for its files."""
        if self._channel is not None:
            self._channel.close()
            await self._session_done.wait()

    async def serve(self, hello: dict, channel: Channel) -> None:
        """Run one authenticated session from its HELLO until the connection ends. The HELLO
        was checked against the VM's spec (agent/l3.py admit): file count and sizes."""
        sizes = [int(f["size"]) for f in hello["files"]]
        if len(sizes) != len(self.paths.files):
            raise WireError(f"primary sends {len(sizes)} files, this replica has {len(self.paths.files)}")
        STALLS.start()
        self._channel, self._session_done = channel, asyncio.Event()
        self.session, self.committed, self.protected_at = str(hello["session"]), None, None
        self._frozen = False  # an authenticated primary feeds it again
        self._state, self._persisted, self._torn = None, False, False
        replicas: list[ReplicaFile] = []
        skipped = False  # a message dropped while frozen: the replica can no longer follow
        beat: asyncio.Task[None] | None = None
        try:
            self.paths.meta.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.paths.device_state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.paths.meta.unlink(missing_ok=True)  # the files stop describing any checkpoint now
            make_guest_ram_dir(self.paths.ram)
            for path, size in zip(self.paths.files, sizes, strict=True):
                replicas.append(ReplicaFile(path, size))
            npages = [size // PAGE for size in sizes]
            limits = standby_limits(npages)
            for r in replicas:
                await asyncio.to_thread(r.zero)
            self.connected, self.last_heard, self._starting = True, time.monotonic(), False
            self.primary_addr = str(channel.writer.get_extra_info("peername"))
            beat = asyncio.create_task(self._heartbeats(channel))
            while True:
                kind, payload = await channel.receive(limits, self._heard)
                self._heard()
                self.bytes_received += len(payload)
                if self._frozen:
                    if kind is not Msg.HEARTBEAT:
                        skipped = True
                        self.dropped += 1
                    continue
                if skipped:  # thawed (no takeover) after dropping some: the next would not apply
                    raise WireError("messages were dropped during a takeover attempt: the replica "
                                    "needs a new session")
                if kind is Msg.PRECOPY:
                    index, delta = decode_precopy(payload, npages)
                    async with self._busy():
                        await asyncio.to_thread(self._apply, replicas, index, delta)
                elif kind is Msg.CHECKPOINT:
                    cp = decode_checkpoint(payload, npages)
                    if isinstance(cp.device_state, StatePatch) and self._state is None:
                        raise WireError("a device state patch before any whole device state")
                    async with self._commit_lock:
                        if self._frozen:
                            skipped = True
                            self.dropped += 1
                            continue
                        async with self._busy():
                            if len(payload) > INLINE_COMMIT:
                                await asyncio.to_thread(self._commit, replicas, cp)
                            else:  # (the usual checkpoint: sooner here than after a hand-over to a thread)
                                self._commit(replicas, cp)
                        self.committed = Committed(self.session, cp.epoch, time.monotonic())
                        await channel.send(encode_ack(cp.epoch))
                    if self.protected_at is None:
                        self.protected_at = time.monotonic()
                    if cp.epoch == 1 and self.on_change:
                        self.on_change()
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            log.info("%s: checkpoint link closed (%s: %s)", self.vm, type(e).__name__, e)
        except WireError as e:  # the stream is not to be trusted any further; the replica holds
            log.warning("%s: checkpoint link dropped: %s", self.vm, e)  # its last commit (meta)
        finally:
            if beat is not None:
                beat.cancel()
            self.connected = False
            for r in replicas:
                r.close()
            self._persist()  # for a start from this replica (the primary may be gone)
            channel.close()
            self._channel = None
            self._session_done.set()
            if self.on_change:
                self.on_change()

    def _commit(self, replicas: list[ReplicaFile], cp: Checkpoint) -> None:
        """Apply checkpoint `cp` (its device state: whole, or patched onto the last one's)."""
        state = cp.device_state
        if isinstance(state, StatePatch):
            assert self._state is not None
            state = state.apply(self._state)
        if self._persisted:  # the record on disk stops being true with the first page applied
            self.paths.meta.unlink(missing_ok=True)
            self._persisted = False
        self._torn = True
        for index, delta in cp.deltas.items():
            self._apply(replicas, index, delta)
        self._state, self._torn = state, False

    def _apply(self, replicas: list[ReplicaFile], index: int, delta: Delta) -> None:
        for seen in self.before_write:
            seen(index, delta.pages)
        replicas[index].apply(delta)

    def feeds(self, session: str) -> bool:
        """Whether the replica files are still those of `session`, applied by this standby only
        (not frozen for a takeover: a QEMU may use them then; not restarted: zeroed then)."""
        return self.session == session and not self._frozen

    @asynccontextmanager
    async def between_commits(self) -> AsyncIterator[tuple[str, int] | None]:
        """No checkpoint is applied while this lasts: the replica files hold (session, epoch),
        the last committed checkpoint of the live session (None: no such checkpoint, or the
        files are being taken over)."""
        async with self._commit_lock:
            c = self.committed
            ok = c is not None and self.connected and not self._frozen and not self._torn and c.session == self.session
            yield (c.session, c.epoch) if ok and c is not None else None

    async def _heartbeats(self, channel: Channel) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self._frozen:
                continue  # a partner taking over goes silent: the primary stops releasing output
            try:
                await channel.send(encode_heartbeat())
                await channel.writer.drain()
            except (ConnectionError, OSError):
                return

    def _heard(self) -> None:
        self.last_heard = time.monotonic()

    @asynccontextmanager
    async def _busy(self) -> AsyncIterator[None]:
        """This side applying what it received: the primary, waiting on us, is not silent.
        Its clock restarts when we can listen again (what it sent meanwhile is queued)."""
        self._applying = True
        try:
            yield
        finally:
            self._applying = False
            self._heard()

    def silent_for(self) -> float:
        """How long the primary has sent nothing, not counting time this side spent applying
        nor time its own event loop could not run (l3/stalls.py)."""
        if self._applying:
            return 0.0
        if not self.last_heard:
            return float("inf")
        now = time.monotonic()
        return now - self.last_heard - STALLS.unheard(self.last_heard, now)


class StandbyServer:
    """The partner agent's listener for every level 3 VM it protects (on its replication
    address). `admit(vm, peer_ip, hello)` returns the VM's Standby if this host is its
    partner and the HELLO comes from the owner's replication address with the spec's
    sizes, else raises WireError with the reason (sent back to the peer). `live_within`:
    a session heard from within that many seconds is live, and a second one is refused."""

    def __init__(self, addr: str, port: int, key: bytes, admit: Callable[[str, str, dict], Standby],
                 live_within: float) -> None:
        self.addr, self.port, self.key, self.admit = addr, port, key, admit
        self.live_within = live_within
        self._server: asyncio.AbstractServer | None = None
        self.refused = 0  # connections turned away (forged, unexpected or malformed)

    async def start(self) -> None:
        # a reader that holds a whole usual checkpoint (~0.5 MiB): with asyncio's 64 KiB default
        # the transport stops reading every 128 KiB until the payload is consumed
        self._server = await asyncio.start_server(self._accept, self.addr, self.port, limit=READER_LIMIT)
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
        peer = str((writer.get_extra_info("peername") or ("?",))[0])
        standby: Standby | None = None
        try:
            hello, body = await read_hello(reader)
            try:
                standby = self.admit(str(hello.get("vm")), peer, hello)
                if standby.live(self.live_within):
                    raise WireError(f"a session for VM {standby.vm} is live")
            except WireError as e:
                self.refused += 1
                log.warning("refused a checkpoint session from %s: %s", peer, e)
                standby = None
                await refuse(writer, str(e))
                return
            standby.begin_handshake()
            channel = await accept_session(reader, writer, self.key, body)
            await standby.end_stale_session()
            await standby.serve(hello, channel)  # live from here: the handshake flag ends there
        except asyncio.IncompleteReadError as e:
            if e.partial:
                self.refused += 1
                log.warning("refused a checkpoint connection from %s: %s", peer, e)
            else:  # closed before sending anything: a partner's liveness probe (agent/l3.py)
                log.debug("a connection from %s closed without a word", peer)
            writer.close()
        except (WireError, TimeoutError, OSError) as e:
            self.refused += 1
            log.warning("refused a checkpoint connection from %s: %s", peer, e)
            writer.close()
        finally:
            if standby is not None:
                standby.end_handshake()
