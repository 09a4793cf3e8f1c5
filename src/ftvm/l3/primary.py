"""Level 3, primary side: checkpoint a running VM to its partner, epoch after epoch.

One epoch (`checkpoint()`):

    stop ── migrate device state (x-ignore-shared) to our socket ─┬─ cont ── send checkpoint N
            compare RAM and disk files with the last copy ────────┘         (partner commits, ACK N)
                                                                            -> relay.release(N)

The guest's frames of epoch N stay in the relay until ACK N (output commit).
Protection starts with a full copy sent while the guest runs (pre-copy rounds);
the first stopped checkpoint then makes the replica consistent.

This class never decides what happens when the partner is lost: it reports
`lost` (the reason) and stops checkpointing, leaving held output held. The
agent records the partner's copy outdated in etcd first (under its fencing
token) and only then calls `unprotect()`, which lets output flow again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..qemu.migrate import ENDED, migration_ended, wait_migration
from .disk_writes import DiskWrites, pages_of
from .pages import PageTracker
from .writes import TrackerError, WriteTracker
from .relay import OutputCommitRelay
from .stalls import STALLS
from .vcpu_load import VcpuLoad
from .channel import Channel, LinkConfig, open_session
from ..qemu.process import QemuError
from .wire import (MAX_DEVICE_STATE, PRIMARY_LIMITS, Checkpoint, Msg, StatePatch, decode_ack, encode_checkpoint,
                   encode_heartbeat, encode_precopy)

log = logging.getLogger(__name__)

SO_SNDBUFFORCE = 32  # (Linux; not in Python's socket module)
HEARTBEAT_S = 0.025  # (and the partner's: l3/standby.py) a 25 ms beat keeps silences short beside l3_partner_lost
# Output-triggered epochs (`on_output`, docs/architecture.md): a checkpoint starts GATHER_S
# after the guest first sends (a reply is often several frames) and at least MIN_RUN_S after
# the last one; then, while the guest is still working (a vCPU ran at least IDLE_BELOW of
# the last POLL_S: more requests are being answered), up to BUSY_RATIO times the last pause
# since the last checkpoint. Without vCPU figures the guest always runs RUN_RATIO x the pause.
GATHER_S = 0.001
MIN_RUN_S = 0.002
BUSY_RATIO = 2.0
IDLE_BELOW = 0.5
POLL_S = 0.0005
RUN_RATIO = 1.0
# Checkpoints in flight (sent, not yet acknowledged) are bounded: on a link slower than the
# guest dirties memory the next checkpoint waits for acknowledgements instead of queueing
# behind the others, so the guest runs longer between checkpoints (pages written twice go
# once) and output waits for the link, not for an ever longer queue (the VM is "link-bound":
# status says so).
MAX_IN_FLIGHT_EPOCHS = 8
MAX_IN_FLIGHT_BYTES = 2 << 20
SEND_WAIT_ABOVE = 0.005  # a checkpoint's sending that took longer waited for the link to take it
SOCKET_BUFFER_ALLOWANCE = 4 << 20  # what the kernel may hold of a TCP stream (tcp_wmem's maximum)
PRECOPY_ROUNDS = 3
PRECOPY_DONE_PAGES = 2048  # stop pre-copying once a round finds fewer dirty pages than this
EXACT = "exact: userfaultfd write-protect (async) + PAGEMAP_SCAN"  # CheckpointStats.tracking


class Qmp(Protocol):
    """What the checkpointer needs from QEMU (QemuVm provides it)."""

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...


@runtime_checkable
class EventQmp(Qmp, Protocol):
    """A monitor that also waits for QEMU's events (qemu/monitor.py DirectQmp)."""

    def expect(self, event: str, match: Callable[[dict[str, Any]], bool] = ...) -> asyncio.Future[dict[str, Any]]: ...


@dataclass(frozen=True)
class EpochRecord:
    """One checkpoint, as the primary saw it (seconds, pages, bytes)."""

    end: float          # monotonic time the guest ran again
    pause: float        # stop -> cont: what the guest lost
    stop: float         # the `stop` command (drains block I/O)
    ram_diff: float     # compare of the RAM file (runs beside the device-state save)
    disk_diff: float    # compare of the disk files (same)
    device_state: float  # migrate of the device state until QEMU reports it complete
    cont: float
    dirty_pages: int    # RAM pages in the checkpoint
    disk_pages: int     # disk pages (4 KiB) in the checkpoint
    nbytes: int         # the whole checkpoint message
    wire_bytes: int = 0  # what it took on the link (compressed, with its MAC)
    link_wait: float = 0.0  # how long it waited for acknowledgements before it began (link-bound)
    send_wait: float = 0.0  # how long its sending waited for the link to take it (after `end`)


@dataclass
class CheckpointStats:
    """Figures for status, metrics and benchmarks."""

    epochs: int = 0
    acked: int = 0
    records: deque[EpochRecord] = field(default_factory=lambda: deque(maxlen=20_000))
    sent_bytes: int = 0
    precopy_bytes: int = 0
    precopy_wire_bytes: int = 0  # what the pre-copy took on the link (compressed, if it was)
    precopy_s: float = 0.0
    ack_times: deque[float] = field(default_factory=lambda: deque(maxlen=200))
    # per epoch, guest resumed -> partner's ACK (sent, applied, acknowledged): how long the
    # epoch's output waits in the relay after the pause
    ack_delays: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20_000))  # (resumed, s)
    ack_log: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=100_000))  # (epoch, when)
    # (when, seconds since the partner's previous message), for gaps over 10 ms: how close the
    # link comes to `l3_partner_lost`
    silences: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20_000))
    # the output-triggered cycle, per epoch (when, seconds): the guest's first held frame ->
    # the checkpoint's start (the gather wait); an ACK's release -> the guest's next held frame
    # (clients' turnaround and the guest's work); and (when, frames) let out per ACK
    output_waits: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20_000))
    replies: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20_000))
    releases: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20_000))
    tracking: str = "page compare"  # how changed RAM pages are found (EXACT, or "page compare: why")
    full_resyncs: int = 0           # checkpoints whose dirty-page scan failed: all of RAM sent
    tracking_error: str = ""        # the last such failure
    disk_tracking: str = "page compare"  # or "dirty bitmaps"
    # a wait for the link under way (for room, or for it to take a checkpoint): since when (monotonic)
    waiting_since: float | None = None

    def window(self, seconds: float, now: float | None = None) -> dict[str, float]:
        """Summary of the epochs that ended in the last `seconds`: percentiles in ms, rates per s,
        and the share of the time the guest ran (not paused for a checkpoint)."""
        now = time.monotonic() if now is None else now
        recs = [r for r in self.records if r.end > now - seconds]
        if not recs:
            return {"epochs": 0, "link_bound": self.link_share(recs, seconds, now)}
        start = max(now - seconds, recs[0].end - recs[0].pause)  # protection may be younger
        span = max(now - start, 1e-3)

        def p(attr: str, q: float) -> float:
            return round(percentile([getattr(r, attr) for r in recs], q) * 1000, 2)
        return {
            "epochs": len(recs), "per_s": round(len(recs) / span, 2),
            "pause_p50_ms": p("pause", 0.5), "pause_p99_ms": p("pause", 0.99),
            "stop_p50_ms": p("stop", 0.5), "ram_diff_p50_ms": p("ram_diff", 0.5),
            "disk_diff_p50_ms": p("disk_diff", 0.5), "device_state_p50_ms": p("device_state", 0.5),
            "cont_p50_ms": p("cont", 0.5),
            "dirty_pages_p50": percentile([float(r.dirty_pages) for r in recs], 0.5),
            "dirty_pages_max": float(max(r.dirty_pages for r in recs)),
            "disk_pages_p50": percentile([float(r.disk_pages) for r in recs], 0.5),
            "bytes_per_s": round(sum(r.nbytes for r in recs) / span),
            "wire_bytes_per_s": round(sum(r.wire_bytes for r in recs) / span),
            "link_bound": self.link_share(recs, seconds, now),
            "link_wait_p50_ms": p("link_wait", 0.5),
            "running_fraction": round(max(0.0, 1 - sum(r.pause for r in recs) / span), 3),
            "ram_diff_p99_ms": p("ram_diff", 0.99),
            "ack_p50_ms": round(percentile([d for t, d in self.ack_delays if t > now - seconds], 0.5) * 1000, 2),
            "silence_max_ms": round(max((g for t, g in self.silences if t > now - seconds), default=0.0) * 1000, 1),
            "output_wait_p50_ms": round(percentile([d for t, d in self.output_waits if t > now - seconds], 0.5)
                                        * 1000, 2),
            "reply_p50_ms": round(percentile([d for t, d in self.replies if t > now - seconds], 0.5) * 1000, 2),
            "frames_p50": percentile([float(n) for t, n in self.releases if t > now - seconds], 0.5),
        }

    def link_share(self, recs: list[EpochRecord], seconds: float, now: float) -> float:
        """The share of the last `seconds` the checkpoints spent waiting for the link: for room
        before they began (checkpoints in flight filled it), for the link to take them after
        the guest ran again, and a wait under way."""
        lo = now - seconds
        waits = [(r.end - r.pause - r.link_wait, r.end - r.pause) for r in recs if r.link_wait > 0]
        waits += [(r.end, r.end + r.send_wait) for r in recs if r.send_wait > 0]
        if self.waiting_since is not None:
            waits.append((self.waiting_since, now))
        waited = sum(max(0.0, min(b, now) - max(a, lo)) for a, b in waits)
        return round(min(1.0, waited / seconds), 3)


def percentile(values: list[float] | deque[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@runtime_checkable
class FdQmp(EventQmp, Protocol):
    """A monitor that can also pass a descriptor with a command (qemu/monitor.py DirectQmp)."""

    async def execute_with_fd(self, cmd: str, args: dict[str, Any] | None, fd: int) -> Any: ...


class DeviceStatePipe:
    """The device state's way from QEMU to the agent, one per checkpoint: a socket pair whose
    QEMU end is handed over (`getfd`) after the previous checkpoint, so the checkpoint's
    `migrate fd:` needs no connection, and whose buffer holds a whole device state, so QEMU
    never waits for the agent to read (a Unix socket it connected to held ~200 KB of the
    ~400 KB: QEMU's save waited on the agent's event loop mid-way)."""

    NAME = "ftvm-devstate"
    BUFFER = 16 << 20

    def __init__(self, qmp: FdQmp) -> None:
        self.qmp = qmp
        self._ours: socket.socket | None = None

    @property
    def armed(self) -> bool:
        return self._ours is not None

    async def arm(self) -> None:
        """QemuError or OSError if QEMU did not take the descriptor (the caller falls back)."""
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:  # as root, past net.core.wmem_max
                theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self.BUFFER)
            except OSError:
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.BUFFER)
            ours.setblocking(False)
            await self.qmp.execute_with_fd("getfd", {"fdname": self.NAME}, theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # QEMU holds its own copy
        self._ours = ours

    async def read(self) -> bytes:
        """The device state QEMU writes for this checkpoint (until it closes its end), bounded."""
        sock, self._ours = self._ours, None
        assert sock is not None, "arm() first"
        loop = asyncio.get_running_loop()
        chunks, size = [], 0
        try:
            while chunk := await loop.sock_recv(sock, 1 << 20):
                size += len(chunk)
                if size > MAX_DEVICE_STATE:
                    raise OSError(f"device state over {MAX_DEVICE_STATE} bytes")
                chunks.append(chunk)
        finally:
            sock.close()
        return b"".join(chunks)

    def close(self) -> None:
        if self._ours is not None:
            self._ours.close()
            self._ours = None


class DeviceStateSink:
    """A Unix socket QEMU's `migrate` writes the device state to (RAM is shared: not sent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._next: asyncio.Future[bytes] | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        # QEMU (its own user) connects: the socket's directory, the VM's private run
        # directory, is what keeps everyone else out
        os.chmod(self.path, 0o666)

    def expect(self) -> asyncio.Future[bytes]:
        self._next = asyncio.get_running_loop().create_future()
        return self._next

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.close()
        if self._next is not None and not self._next.done():
            self._next.set_result(data)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)


class Checkpointer:
    def __init__(self, vm: str, qmp: Qmp, relays: list[OutputCommitRelay], ram: Path, disks: list[Path],
                 run_dir: Path, interval_s: float, timeout_s: float = 0.5, on_output: bool = False,
                 stall_s: float = 2.0, ram_writes: Callable[[Path], WriteTracker] | None = None,
                 tracking: str = "page compare", disk_nodes: list[str] | None = None,
                 vcpu_load: VcpuLoad | None = None) -> None:
        """`interval_s`: longest time the guest runs between checkpoints. `on_output`: also
        checkpoint as soon as the guest sends a frame (held output waits less). `stall_s`: a
        checkpoint under way longer stops the heartbeats (the partner takes over).
        `ram_writes`: attaches exact write tracking to the RAM file (l3/writes.py); without
        it, or if it fails, RAM is compared. `tracking`: why not, if not. `disk_nodes`: the
        disks' top nodes, whose writes QEMU dirty bitmaps record (l3/disk_writes.py);
        without them the disks are compared. `vcpu_load`: whether the guest is still
        working (output-triggered epochs wait for it); closed with the checkpointer."""
        self.vm = vm
        self.qmp = qmp
        self.relays = relays  # one per NIC
        self.files = [ram, *disks]
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.sink = DeviceStateSink(run_dir / "devstate.sock")  # (a QEMU that cannot take `getfd`)
        self.pipe = DeviceStatePipe(qmp) if isinstance(qmp, FdQmp) else None
        self.stats = CheckpointStats(tracking=tracking)
        self.ram_writes = ram_writes
        self.disk_writes = DiskWrites(qmp, disk_nodes, run_dir / "bitmaps.sock") if disk_nodes else None
        self.stats.disk_tracking = "dirty bitmaps" if disk_nodes else "page compare"
        self.epoch = 0
        self.lost: str | None = None           # why the partner is gone (None: it is not)
        self.lost_event = asyncio.Event()
        self.first_ack = asyncio.Event()
        self._trackers: list[PageTracker] = []
        self._writer: asyncio.StreamWriter | None = None
        self._channel: Channel | None = None
        self._sizes: list[int] = []
        self._sent_epoch = 0  # the last epoch whose CHECKPOINT was sent
        self._in_flight: dict[int, int] = {}  # epochs sent, not acknowledged: their bytes on the link
        self._acked = asyncio.Event()         # an ACK came (a wait for room on the link ends)
        self._link_wait = 0.0                 # the next checkpoint's wait for room
        self._last_state: bytes | None = None  # its device state
        self._resumed: dict[int, float] = {}  # epochs not yet acknowledged: when the guest ran again
        self._diff_task: asyncio.Task[Any] | None = None  # a compare thread maps the files
        self._tasks: list[asyncio.Task[None]] = []
        self._last_heard = time.monotonic()
        self._last_sent = time.monotonic()
        self._lock = asyncio.Lock()  # one checkpoint at a time
        self._checkpoint_since: float | None = None  # when the checkpoint under way began
        self.stall_s = stall_s
        self._closed = False
        self._final = False  # a planned switchover took the last checkpoint: the guest stays stopped
        self._output = asyncio.Event()
        self._held_at: float | None = None  # the first frame held since the last checkpoint began
        self._released_at = 0.0             # the last ACK that let frames out
        self._changed = asyncio.Event()  # set_interval: the wait under way starts over
        self.vcpu_load = vcpu_load
        self.on_output = False
        self.set_interval(interval_s, on_output)

    def set_interval(self, interval_s: float, on_output: bool) -> None:
        """Change the epoch length and trigger, from now on (a wait for the old interval ends:
        a change from 10 s epochs took up to 10 s to show)."""
        self.interval_s, self.on_output = interval_s, on_output
        for relay in self.relays:
            relay.on_held = self._on_held if on_output else None
        self._changed.set()

    def _on_held(self) -> None:
        if self._held_at is None:
            now = self._held_at = time.monotonic()
            if self._released_at:
                self.stats.replies.append((now, now - self._released_at))
        self._output.set()

    # --- set-up ----------------------------------------------------------------------
    async def prepare_qemu(self) -> None:
        """Once per QEMU: device state only (shared RAM is skipped), at full speed."""
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]})
        # device state only, to a local socket: no TLS (a VM that came in by live migration
        # still has the migration's TLS credentials set)
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "tls-creds": ""})
        await self.sink.start()
        await self._arm_pipe()

    async def connect(self, addr: str, link: LinkConfig, session: str) -> None:
        """Open the checkpoint link and authenticate both ends (l3/channel.py): OSError or
        TimeoutError if the partner is unreachable, AuthError if it refuses or cannot prove
        it holds the pool's key."""
        local = (link.local_addr, 0) if link.local_addr else None
        reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, link.port, local_addr=local), 2.0)
        self._writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sizes = [os.path.getsize(f) for f in self.files]
        self._channel = await open_session(reader, writer, link.key, {"vm": self.vm, "session": session, "files": [
            {"name": f.name, "size": size} for f, size in zip(self.files, self._sizes, strict=True)]},
            compress=link.compress)

    @property
    def compressed(self) -> bool:
        """Whether checkpoints go compressed (asked for, and the partner accepted)."""
        return self._channel is not None and self._channel.compress

    async def protect(self, on_progress: Callable[[float], None] | None = None) -> None:
        """Pre-copy everything while the guest runs, then take the first stopped checkpoint.
        Returns once the partner acknowledged it: the replica is consistent from then on.
        Raises OSError/TimeoutError if the partner fails."""
        channel = self._channel
        assert channel is not None, "connect() first"
        if self.disk_writes is not None:
            await self.disk_writes.start()  # before the pre-copy reads the disks
        self._trackers = [await asyncio.to_thread(self._tracker, i, f) for i, f in enumerate(self.files)]
        if [t.size for t in self._trackers] != self._sizes:
            raise RuntimeError("a replicated file changed size since the session began")
        self._tasks.append(asyncio.create_task(self._read_partner(channel), name=f"l3-acks-{self.vm}"))
        t0 = time.monotonic()
        total = sum(t.size for t in self._trackers)
        done = 0
        for index, tracker in enumerate(self._trackers):
            chunks = tracker.precopy_chunks()
            while True:
                delta = await asyncio.to_thread(next, chunks, None)
                if delta is None:
                    break
                self.stats.precopy_wire_bytes += await self._send(encode_precopy(index, delta))
                self.stats.precopy_bytes += delta.nbytes
                done += delta.nbytes
                if on_progress:
                    on_progress(min(0.99, done / total))
        for _ in range(PRECOPY_ROUNDS):  # re-send what the running guest changed meanwhile
            dirty = 0
            for index, tracker in enumerate(self._trackers):
                if not tracker.finds_changes:
                    continue  # a bitmap-tracked disk: its writes meanwhile go in checkpoint 1
                delta = await asyncio.to_thread(tracker.diff)
                dirty += len(delta.pages)
                self.stats.precopy_wire_bytes += await self._send(encode_precopy(index, delta))
                self.stats.precopy_bytes += delta.nbytes
            if dirty < PRECOPY_DONE_PAGES:
                break
        self.stats.precopy_s = time.monotonic() - t0
        STALLS.start()
        self._tasks.append(asyncio.create_task(self._heartbeats(), name=f"l3-heartbeat-{self.vm}"))
        for relay in self.relays:  # from now on output waits for the acks of its checkpoints
            # what the guest sends until the first checkpoint is that checkpoint's: a relay
            # that served an earlier session still counts that session's epochs, and output
            # tagged with them would wait for this session to get as far (seen: a client
            # stalled for tens of seconds after the partner came back)
            relay.begin_epoch(1)
            relay.gated = True
        await self.checkpoint()
        await asyncio.wait_for(self._wait_first_ack(), max(5.0, self.timeout_s * 4))
        log.info("%s: pre-copy %.1f MiB in %.2fs; first checkpoint acknowledged", self.vm,
                 self.stats.precopy_bytes / 2**20, self.stats.precopy_s)

    def _tracker(self, index: int, path: Path) -> PageTracker:
        """RAM (file 0) tracked exactly where possible; every other file compared."""
        if index == 0 and self.ram_writes is not None:
            try:
                writes = self.ram_writes(path)
                try:
                    tracker = PageTracker(path, writes)
                except BaseException:
                    writes.close()
                    raise
            except TrackerError as e:
                self.stats.tracking = f"page compare: {e}"
                log.warning("%s: RAM writes cannot be tracked, comparing pages: %s", self.vm, e)
            else:
                self.stats.tracking = EXACT
                return tracker
        return PageTracker(path, compare=index == 0 or self.disk_writes is None)

    async def _wait_first_ack(self) -> None:
        lost = asyncio.create_task(self.lost_event.wait())
        first = asyncio.create_task(self.first_ack.wait())
        await asyncio.wait({lost, first}, return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        first.cancel()
        if self.lost:
            raise OSError(self.lost)

    async def run(self) -> None:
        """Checkpoint every interval (or on output) until the partner is lost or `close()`."""
        while not self._closed and self.lost is None:
            self._changed.clear()
            if not await self._epoch_due():
                continue  # new settings: wait by them
            if self._closed or self.lost is not None:
                return
            await self._room_on_link()
            if self._closed or self.lost is not None:
                return
            await self.checkpoint()

    async def _room_on_link(self) -> None:
        """Wait while the checkpoints in flight fill the link (MAX_IN_FLIGHT_*)."""
        t0, waited = time.monotonic(), False
        while (self._in_flight and (len(self._in_flight) >= MAX_IN_FLIGHT_EPOCHS
                                    or sum(self._in_flight.values()) >= MAX_IN_FLIGHT_BYTES)
               and self.lost is None and not self._closed):
            if not waited:
                waited, self.stats.waiting_since = True, t0
            self._acked.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    await self._acked.wait()
        self.stats.waiting_since = None
        self._link_wait = time.monotonic() - t0 if waited else 0.0

    async def _epoch_due(self) -> bool:
        """Wait for the next epoch: the interval, or held output (on_output). False if
        the settings changed meanwhile."""
        waits = [asyncio.ensure_future(self._changed.wait())]
        if self.on_output:
            waits.append(asyncio.ensure_future(self._output.wait()))
        try:
            await asyncio.wait(waits, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._changed.is_set():
            return False
        if self.on_output and self._output.is_set():
            await self._until_answered()
            self._output.clear()
        return True

    def output_wait(self, now: float) -> float:
        """Output is held: how long until its checkpoint may start, at least (see GATHER_S)."""
        if not self.stats.records:
            return GATHER_S
        last = self.stats.records[-1]
        ratio = 0.0 if self.vcpu_load is not None else RUN_RATIO
        return max(GATHER_S, last.end + max(MIN_RUN_S, ratio * last.pause) - now)

    async def _until_answered(self) -> None:
        load = self.vcpu_load
        if load is not None:
            with suppress(OSError):
                load.busy()  # (the share from here on)
        await asyncio.sleep(self.output_wait(time.monotonic()))
        if load is None or not self.stats.records:
            return
        last = self.stats.records[-1]
        deadline = last.end + BUSY_RATIO * last.pause
        try:
            while time.monotonic() < deadline and load.busy() >= IDLE_BELOW:
                await asyncio.sleep(POLL_S)
        except OSError:  # QEMU gone: the checkpoint will say so
            return

    # --- one epoch ----------------------------------------------------------------------
    async def final_checkpoint(self, timeout_s: float = 5.0) -> int:
        """Planned switchover: a last checkpoint with the guest left stopped, returned once
        the partner acknowledged it (so every frame the guest sent has been released and
        the partner's replica is this exact instant). No further epoch starts until
        `cancel_final()`. Raises RuntimeError if the partner did not acknowledge it."""
        await self.checkpoint(resume=False, final=True)
        epoch = self.epoch
        deadline = time.monotonic() + timeout_s
        while self.stats.acked < epoch:
            if self.lost is not None:
                raise RuntimeError(f"final checkpoint {epoch} not acknowledged: {self.lost}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"final checkpoint {epoch} not acknowledged within {timeout_s:.0f}s")
            await asyncio.sleep(0.001)
        return epoch

    @asynccontextmanager
    async def between_epochs(self) -> AsyncIterator[None]:
        """No checkpoint runs while this lasts (one under way ends first): the guest may be
        reset and resumed through QMP without meeting a checkpoint's stop and migrate
        ("Migration is not finalized yet"; agent/guest.py)."""
        async with self._lock:
            yield

    async def hold(self) -> None:
        """Wait for a checkpoint under way, then take no more (checkpointing is ending)."""
        async with self._lock:
            self._final = True

    def cancel_final(self) -> None:
        """The switchover did not happen: epochs go on (the caller resumes the guest)."""
        self._final = False

    async def checkpoint(self, resume: bool = True, final: bool = False) -> None:
        """One epoch. `resume=False` leaves the guest stopped afterwards (fidelity checks,
        switchover). After a `final` one, no epoch runs (it would resume the guest)."""
        async with self._lock:
            if self.lost is not None or self._writer is None:
                if final:
                    raise RuntimeError(f"no checkpoint link: {self.lost or 'not connected'}")
                return
            if self._final:
                return
            self._final = final
            epoch = self.epoch + 1
            t0 = time.monotonic()
            self._checkpoint_since = t0
            if self._held_at is not None:
                self.stats.output_waits.append((t0, t0 - self._held_at))
                self._held_at = None
            try:
                try:
                    deltas, times, device_state, t_stop, dev_s = await self._capture()
                except Exception as e:
                    # no checkpoint this epoch: the guest must not stay stopped, the partner is behind
                    self._set_lost(f"checkpoint {epoch} failed: {e}")
                    self._final = False
                    await self.qmp.execute("cont")
                    if final:
                        raise RuntimeError(f"final checkpoint failed: {e}") from e
                    return
                for relay in self.relays:  # what the guest sends from now on is epoch N+1's
                    relay.begin_epoch(epoch + 1)
                self._count_full_resyncs(epoch)
                t_cont = time.monotonic()
                # the next checkpoint's device-state pipe and disk bitmap exports go to QEMU right
                # behind `cont`, in the same write (it runs them once the guest runs again): after
                # it, one by one, they kept the next checkpoint from starting for ~5 ms
                resumed = asyncio.ensure_future(self.qmp.execute("cont")) if resume else None
                following = asyncio.ensure_future(self._prepare_next())
                try:
                    if resumed is not None:
                        await resumed
                    end = time.monotonic()
                except BaseException:
                    await asyncio.wait({following})
                    raise
                self.epoch = epoch
                # the device state as what changed since the last one sent (most of it never does)
                patch = StatePatch.between(self._last_state, device_state) if self._last_state is not None else None
                cp = Checkpoint(epoch, deltas, device_state if patch is None else patch)
                self._last_state = device_state
                self.stats.epochs += 1
                self._sent_epoch = epoch
                self._resumed[epoch] = end
                self._in_flight[epoch] = cp.nbytes  # (until the send says what it took)
                self.stats.waiting_since = end  # (a large checkpoint on a slow link: until it is taken)
                try:
                    wire = await self._send(encode_checkpoint(cp))
                finally:
                    self.stats.waiting_since = None
                sent = time.monotonic() - end
                if epoch in self._in_flight:
                    self._in_flight[epoch] = wire
                self.stats.records.append(EpochRecord(
                    end=end, pause=end - t0, stop=t_stop - t0, ram_diff=times[0], disk_diff=sum(times[1:]),
                    device_state=dev_s, cont=end - t_cont, dirty_pages=len(deltas[0].pages),
                    disk_pages=sum(len(d.pages) for i, d in deltas.items() if i), nbytes=cp.nbytes,
                    wire_bytes=wire, link_wait=self._link_wait,
                    send_wait=sent if sent > SEND_WAIT_ABOVE else 0.0))
                self._link_wait = 0.0
                self.stats.sent_bytes += cp.nbytes
                await following
                if self.disk_writes is not None:  # the next epoch's bitmaps readable, this one's gone
                    await self.disk_writes.advance()
            finally:
                self._checkpoint_since = None

    async def _capture(self) -> tuple[dict[int, Any], list[float], bytes, float, float]:
        """Stop the guest; then, at once, the device state (QEMU) and the changed pages (us).
        Returns the pages, the seconds each file's part took, the device state, when the
        guest had stopped, and the seconds from then to the end of the save.

        `stop`, the disks' next bitmaps and `migrate` go to QEMU in one write, which it runs
        in order (block-layer commands must come before `migrate`, which leaves the block
        nodes inactive): one round trip instead of three. The changed pages are looked for
        from the moment `stop` is answered (the guest has stopped and its I/O drained)."""
        piped = self.pipe is not None and self.pipe.armed
        state = (asyncio.ensure_future(self.pipe.read()) if self.pipe is not None and piped
                 else self.sink.expect())
        uri = f"fd:{DeviceStatePipe.NAME}" if piped else f"unix:{self.sink.path}"
        # QEMU says when the save is over: its MIGRATION event on the checkpoint monitor,
        # else (a QEMU without one) `query-migrate` polled
        done = (self.qmp.expect("MIGRATION", lambda d: d.get("status") in ENDED)
                if isinstance(self.qmp, EventQmp) else None)
        commands: list[tuple[str, dict[str, Any] | None]] = [("stop", None)]
        if self.disk_writes is not None:
            commands += self.disk_writes.rotate()
        commands.append(("migrate", {"uri": uri}))
        replies = await self._send_commands(commands, pipelined=done is not None)
        diff: asyncio.Task[tuple[dict[int, Any], list[float]]] | None = None
        migrating = False
        try:
            await replies[0]  # stopped
            t_stop = time.monotonic()
            diff = asyncio.create_task(asyncio.to_thread(self._diff_all))
            self._diff_task = diff
            for reply in replies[1:]:
                await reply
            migrating = True
            await self._wait_migrated(done)
            device_state = await asyncio.wait_for(state, 10.0)
            dev_s = time.monotonic() - t_stop
        except BaseException:
            # every reply in, and a save that began ended, before the caller's `cont`
            results = await asyncio.gather(*replies, return_exceptions=True)
            if not migrating and len(results) == len(commands) and not isinstance(results[-1], BaseException):
                with suppress(Exception):  # noqa: BLE001 - failing already
                    await self._wait_migrated(done)
            raise
        finally:
            if done is not None:
                done.cancel()  # (no-op once it came)
            if diff is not None:
                deltas, times = await diff
        return deltas, times, device_state, t_stop, dev_s

    async def _prepare_next(self) -> None:
        """What the next checkpoint needs from QEMU, asked at once: its device-state pipe and
        the exports of the disk bitmaps recording now (a failed export makes `advance` fail)."""
        commands = self.disk_writes.exports() if self.disk_writes is not None else []
        replies = [asyncio.ensure_future(self._arm_pipe()),
                   *(asyncio.ensure_future(self.qmp.execute(cmd, args)) for cmd, args in commands)]
        for result in await asyncio.gather(*replies, return_exceptions=True):
            if isinstance(result, QemuError):
                log.warning("%s: preparing the next checkpoint: %s", self.vm, result)
            elif isinstance(result, BaseException):
                raise result

    async def _arm_pipe(self) -> None:
        """The next checkpoint's device-state pipe, handed to QEMU now (off the pause). If
        QEMU does not take it, that checkpoint uses the Unix socket instead."""
        if self.pipe is None:
            return
        try:
            await self.pipe.arm()
        except (QemuError, OSError) as e:
            log.warning("%s: device state pipe not handed over (%s): the next checkpoint connects", self.vm, e)

    async def _send_commands(self, commands: list[tuple[str, dict[str, Any] | None]],
                             pipelined: bool) -> list[asyncio.Future[Any]]:
        """The commands' replies, as futures. `pipelined` (the checkpoint monitor): all written
        at once, each task writing its line before it awaits, in the order made. Otherwise
        (the main monitor, qemu.qmp) one after the other."""
        if pipelined:
            return [asyncio.ensure_future(self.qmp.execute(cmd, args)) for cmd, args in commands]
        out: list[asyncio.Future[Any]] = []
        for cmd, args in commands:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            try:
                fut.set_result(await self.qmp.execute(cmd, args))
            except Exception as e:  # noqa: BLE001 - handed to the caller, as a pipelined reply would be
                fut.set_exception(e)
                out.append(fut)
                break
            out.append(fut)
        return out

    def _count_full_resyncs(self, epoch: int) -> None:
        full = sum(t.full_resyncs for t in self._trackers)
        if full > self.stats.full_resyncs:
            self.stats.full_resyncs = full
            self.stats.tracking_error = next((t.last_error for t in self._trackers if t.last_error), "")
            log.warning("%s: dirty-page scan failed (%s): all of RAM sent in checkpoint %d", self.vm,
                        self.stats.tracking_error, epoch)

    def _diff_all(self) -> tuple[dict[int, Any], list[float]]:
        """(In a thread, guest stopped.) Changed pages of every file, and the seconds each
        file's part took (a disk's: reading its bitmap over NBD, then its written pages)."""
        deltas, times = {}, []
        t = time.monotonic()
        deltas[0] = self._trackers[0].diff()
        times.append(time.monotonic() - t)
        t = time.monotonic()
        if self.disk_writes is not None:
            written = self.disk_writes.read()
            for i, (tracker, extents) in enumerate(zip(self._trackers[1:], written, strict=True), 1):
                deltas[i] = tracker.delta_of(pages_of(extents, tracker.npages))
        else:
            for i, tracker in enumerate(self._trackers[1:], 1):
                deltas[i] = tracker.diff()
        times.append(time.monotonic() - t)
        return deltas, times

    async def _wait_migrated(self, done: asyncio.Future[dict[str, Any]] | None) -> None:
        if done is None:
            await wait_migration(self.qmp, "device state save", poll=0.001)
        else:
            await migration_ended(self.qmp, done, "device state save", 10.0)

    # --- the partner link -----------------------------------------------------------------
    async def _send(self, parts: list[bytes]) -> int:
        """Send one message; returns the bytes it took on the link (0: not sent)."""
        if self._writer is None or self._channel is None or self.lost is not None:
            return 0
        try:
            wire = await self._channel.send(parts)
            self._last_sent = time.monotonic()
            # A backstop only: the partner's heartbeats, the other way, tell whether it lives.
            # Whatever is queued before this message drains first (on a slow link a heartbeat
            # waits behind a large checkpoint): allow for all of it, and for the socket's own
            # buffer, at 1 MB/s (links down to 8 Mb/s).
            queued = self._writer.transport.get_write_buffer_size() + SOCKET_BUFFER_ALLOWANCE
            await asyncio.wait_for(self._writer.drain(), self.timeout_s * 4 + queued / 1e6)
            return wire
        except (OSError, TimeoutError) as e:
            self._set_lost(f"checkpoint link to the partner failed: {e or type(e).__name__}")
            return 0

    async def _read_partner(self, channel: Channel) -> None:
        try:
            while True:
                kind, payload = await channel.receive(PRIMARY_LIMITS)
                now = time.monotonic()
                if now - self._last_heard > 0.01 and self.first_ack.is_set():  # (protected: heartbeats flow)
                    self.stats.silences.append((now, now - self._last_heard))
                self._last_heard = now
                if kind is Msg.ACK:
                    epoch = decode_ack(payload)
                    if not self.stats.acked < epoch <= self._sent_epoch:
                        # never sent, or acknowledged already: releasing on it could let out
                        # output whose checkpoint the partner does not hold
                        log.warning("%s: ignored an ACK for epoch %d (sent up to %d, acknowledged %d)",
                                    self.vm, epoch, self._sent_epoch, self.stats.acked)
                        continue
                    self.stats.ack_log.append((epoch, time.monotonic()))  # before any release
                    self._record_ack_delay(epoch)
                    self.stats.ack_times.append(self._last_heard)
                    self.stats.acked = epoch
                    for done in [e for e in self._in_flight if e <= epoch]:
                        del self._in_flight[done]
                    self._acked.set()
                    frames = sum(relay.release(epoch) for relay in self.relays)
                    if frames:
                        self._released_at = time.monotonic()
                        self.stats.releases.append((self._released_at, frames))
                    self.first_ack.set()
        except (OSError, asyncio.IncompleteReadError, RuntimeError) as e:
            self._set_lost(f"partner closed the checkpoint link ({type(e).__name__})")

    def _record_ack_delay(self, epoch: int) -> None:
        while self._resumed:  # (in epoch order; an ACK covers every epoch up to its own)
            first = next(iter(self._resumed))
            if first > epoch:
                break
            resumed = self._resumed.pop(first)
            if first == epoch:
                self.stats.ack_delays.append((resumed, self._last_heard - resumed))

    async def _heartbeats(self) -> None:
        while self.lost is None and not self._closed:
            await asyncio.sleep(HEARTBEAT_S / 2)
            now = time.monotonic()
            # (time this side's own event loop could not run does not count: l3/stalls.py)
            if now - self._last_heard - STALLS.unheard(self._last_heard, now) > self.timeout_s:
                self._set_lost(f"partner silent for {now - self._last_heard:.2f}s")
                return
            # a checkpoint under way still heartbeats (the partner would otherwise take a
            # slow epoch on a loaded host for a dead primary), but only up to `stall_s`: a
            # checkpoint stuck longer (QEMU hung) is a failed primary, which the partner
            # replaces from the last committed checkpoint
            busy = self._checkpoint_since
            if now - self._last_sent >= HEARTBEAT_S and (busy is None or now - busy < self.stall_s):
                await self._send(encode_heartbeat())

    def _set_lost(self, why: str) -> None:
        if self.lost is None and not self._closed:
            self.lost = why
            log.warning("%s: %s", self.vm, why)
            self.lost_event.set()
            # run() returns at once, not after its wait for the next epoch (up to an interval):
            # the agent must record the partner outdated before the partner's takeover limit
            self._changed.set()

    # --- endings --------------------------------------------------------------------------
    def unprotect(self) -> int:
        """The partner's copy is recorded outdated: output flows without acks again.
        Returns how many held frames were let out."""
        released = 0
        for relay in self.relays:
            relay.gated = False
            released += relay.release(1 << 62)
        return released

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._writer is not None:
            self._writer.close()
        if self._diff_task is not None:
            # A compare under way still reads the mapped files: let it end. asyncio.wait never
            # raises the task's own outcome (it may have been cancelled with its checkpoint, its
            # thread still running: the trackers then leave their maps to the garbage collector).
            await asyncio.wait({self._diff_task})
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        if self.disk_writes is not None:
            await self.disk_writes.close()
        await self.sink.close()
        if self.pipe is not None:
            self.pipe.close()
        if self.vcpu_load is not None:
            self.vcpu_load.close()
