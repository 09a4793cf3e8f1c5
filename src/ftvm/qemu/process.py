"""Run one VM's QEMU: its tap devices, the process, and one long-lived QMP connection.

QEMU is the child of a keeper (qemu/keeper.py), not of the agent: it outlives an agent
restart, never the host's fence deadline. The kill path uses a pidfd, so a recycled PID
can never be hit.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import fcntl
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..core.model import VmSpec
from . import keeper
from .cmdline import Checkpointed, VmPaths, build_cmdline, listening_socket, tap_names
from .runas import RunAs
from .tls import QemuTls
from .probe import Accel

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: no dlopen between fork and exec


def die_with_parent() -> None:  # runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class Fence:
    """The host's fence deadline as QEMU's keeper reads it (agent/fence.py writes it)."""

    deadline_file: Path
    lease: int
    check: float


class QemuError(RuntimeError):
    """QEMU could not be started, or did not do what it was asked."""


class QmpError(QemuError):
    """A QMP command failed: QEMU refused it (`error_class`: the class QEMU named, e.g.
    "GenericError", "DeviceNotFound"), or the connection is gone (`error_class` None)."""

    def __init__(self, cmd: str, message: str, error_class: str | None = None) -> None:
        super().__init__(f"{cmd}: {message}")
        self.cmd, self.error_class = cmd, error_class


async def set_migration_tls(qemu: Any, creds: str) -> None:
    """Before every `migrate`/`migrate-incoming`: TLS on a stream between hosts (`creds`, an
    object id from qemu/tls.py), none on a local unix socket (""). QEMU keeps the
    parameter, so a VM that came in over TLS must drop it before its next local one."""
    await qemu.execute("migrate-set-parameters", {"tls-creds": creds})


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise QemuError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else "no output"


def ensure_tap(tap: str, bridge: str | None, user: int | None = None) -> None:
    """A persistent tap on the host bridge (recreated so no stale state survives), owned by
    `user` (QEMU's): an unprivileged QEMU may attach to it, and to no other interface.
    `bridge` None: on no bridge (an isolated NIC: the guest reaches nothing)."""
    if Path(f"/sys/class/net/{tap}").exists():
        _ip("link", "del", tap)
    _ip("tuntap", "add", "dev", tap, "mode", "tap", *(("user", str(user)) if user is not None else ()))
    if bridge is None:
        _ip("link", "set", tap, "up")
    else:
        _ip("link", "set", tap, "master", bridge, "up")


def tap_on_bridge(tap: str, bridge: str) -> bool:
    master = Path(f"/sys/class/net/{tap}/master")
    return master.exists() and master.resolve().name == bridge


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(name: str) -> int:
    """Attach to (or create) tap `name`; returns a non-blocking fd. The agent opens the
    taps and passes them to QEMU: an unprivileged QEMU cannot open /dev/net/tun itself."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_tap(tap: str) -> None:
    if Path(f"/sys/class/net/{tap}").exists():
        subprocess.run(["ip", "link", "del", tap], capture_output=True)


def _files_opened(spec: VmSpec, blockdevs: list[list[dict[str, Any]]] | None,
                  checkpointed: Checkpointed | None) -> list[str]:
    """The files a QEMU started with these arguments opens itself."""
    def file_nodes(node: Any) -> list[str]:  # file nodes may sit inside format nodes
        if not isinstance(node, dict):
            return []
        here = [str(node["filename"])] if node.get("driver") == "file" and "filename" in node else []
        return here + [f for v in node.values() for f in file_nodes(v)]

    files = [d.path for d in spec.disks] if blockdevs is None else [
        f for nodes in blockdevs for node in nodes for f in file_nodes(node)]
    if checkpointed is not None:
        files.append(checkpointed.ram_file)
    return files


class QemuProcess(Protocol):
    """What QemuVm needs of the process: a keeper's `Kept`, or (tests) an asyncio Process."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class QemuVm:
    """One running QEMU. Create with `await QemuVm.start(...)`, or `adopt` one a keeper
    kept running through an agent restart."""

    def __init__(self, spec: VmSpec, paths: VmPaths, proc: QemuProcess,
                 pidfd: int, taps: list[str], run_as: RunAs | None = None) -> None:
        self.spec = spec
        self.run_as = run_as  # the user this QEMU runs as (None: root)
        self.paths = paths
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = pidfd
        self.taps = taps
        self.qmp = QMPClient(spec.name)
        self.started_at = time.time()
        self.stop_requested = False
        self.stop_outcome = ""  # how stop() ended it: guest, quit, grace expired, hurried, killed
        self._event_task: asyncio.Task[None] | None = None

    @staticmethod
    async def start(spec: VmSpec, paths: VmPaths, accel: Accel, bridge: str,
                    on_event: Callable[[str, dict[str, Any]], None] | None = None,
                    blockdevs: list[list[dict[str, Any]]] | None = None, paused: bool = False,
                    debug_qmp: bool = False, checkpointed: Checkpointed | None = None,
                    incoming: bool = False, tls: QemuTls | None = None, run_as: RunAs | None = None,
                    env: dict[str, str] | None = None, fence: Fence | None = None) -> QemuVm:
        """`checkpointed` (level 3): the caller owns the taps (its relay listens on
        `paths.nic_socket(i)` before this is called). `run_as`: the unprivileged user
        QEMU runs as; it is handed the files this QEMU opens (qemu/runas.py). `env`: added
        to QEMU's environment (level 3: the write-tracking shim, l3/writes.py). `fence`: the
        deadline its keeper enforces (None: tests without an agent, a deadline file of
        the run directory's own, far ahead)."""
        if blockdevs is None:
            for disk in spec.disks:
                if not Path(disk.path).exists():
                    raise QemuError(f"disk image {disk.path} does not exist")
        if run_as is not None:
            run_as.private_dir(paths.run_dir)
            run_as.own(*_files_opened(spec, blockdevs, checkpointed), paths.serial,
                       *(paths.nic_socket(i) for i in range(len(spec.nics))))
            if checkpointed is not None:
                run_as.own(Path(checkpointed.ram_file).parent)
        else:
            paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        paths.qmp.unlink(missing_ok=True)
        paths.debug_qmp.unlink(missing_ok=True)
        paths.console.unlink(missing_ok=True)
        taps = tap_names(spec)
        tap_fds: list[int] = []
        if checkpointed is None:
            for nic, tap in zip(spec.nics, taps, strict=True):
                ensure_tap(tap, None if nic.isolated else bridge, run_as.uid if run_as else None)
                tap_fds.append(open_tap(tap))
        tls_dir = paths.run_dir / "tls" if tls is not None else None
        if tls is not None and tls_dir is not None:
            tls.write(tls_dir, (run_as.uid, run_as.gid) if run_as else None)
        monitors = [paths.qmp] + ([paths.checkpoint_qmp] if checkpointed is not None else []) + (
            [paths.debug_qmp] if debug_qmp else [])
        monitor_fds: dict[Path, int] = {}
        try:
            for path in monitors:
                monitor_fds[path] = listening_socket(path)
            cmd = build_cmdline(spec, paths, accel, taps, blockdevs, paused or incoming, debug_qmp, checkpointed,
                                incoming, tls_dir, tap_fds, monitor_fds)
            log.info("starting %s: %s", spec.name, " ".join(cmd))
            if fence is None:
                fence = Fence(paths.run_dir / "fence-deadline", 1, 0.05)
                keeper.write_deadline(fence.deadline_file, fence.lease, time.monotonic() + 10 * 365 * 86400)
            user = (run_as.uid, run_as.gid, run_as.groups) if run_as is not None else None
            try:
                kept = await keeper.spawn(cmd, paths.run_dir, paths.run_dir / "qemu.log", fence.deadline_file,
                                          fence.lease, fence.check, tap_fds + list(monitor_fds.values()), user,
                                          env or {})
            except keeper.KeeperError as e:
                raise QemuError(f"QEMU did not start: {e}: {_last_line(paths.run_dir / 'qemu.log')}") from None
        finally:
            # QEMU holds its own copies; a tap held here could not be reopened
            for fd in tap_fds + list(monitor_fds.values()):
                os.close(fd)
        return await QemuVm.attach(spec, paths, kept, taps if checkpointed is None else [], run_as, on_event)

    @staticmethod
    async def attach(spec: VmSpec, paths: VmPaths, proc: QemuProcess, taps: list[str],
                     run_as: RunAs | None = None,
                     on_event: Callable[[str, dict[str, Any]], None] | None = None) -> QemuVm:
        """A QemuVm for a process just started, once its QMP socket (`paths.qmp`) answers.
        `start` uses it; so do tests, with a fake QEMU (tests/fake_qemu.py), and `adopt`."""
        pidfd = proc.open_pidfd() if isinstance(proc, keeper.Kept) else os.pidfd_open(proc.pid)
        vm = QemuVm(spec, paths, proc, pidfd, taps, run_as)
        try:
            await vm._connect_qmp(timeout=10.0)
        except BaseException:
            vm.kill()
            await vm.wait()
            raise
        if on_event is not None:
            vm._event_task = asyncio.create_task(vm._pump_events(on_event))
        return vm

    @staticmethod
    async def adopt(spec: VmSpec, paths: VmPaths, kept: keeper.Kept, taps: list[str], run_as: RunAs | None,
                    on_event: Callable[[str, dict[str, Any]], None] | None) -> QemuVm:
        """The QEMU a keeper kept running while no agent watched it: connect to it again.
        Its start time is its process's, not now."""
        vm = await QemuVm.attach(spec, paths, kept, taps, run_as, on_event)
        try:
            ticks = keeper.process_start(kept.pid) / os.sysconf("SC_CLK_TCK")
            vm.started_at = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks)
        except OSError:
            pass
        return vm

    async def _connect_qmp(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise QemuError(f"QEMU exited at start (code {self.proc.returncode}): "
                                f"{_last_line(self.paths.run_dir / 'qemu.log')}")
            if self.paths.qmp.exists():
                try:  # (bounded: a listening socket accepts before QEMU greets)
                    await asyncio.wait_for(self.qmp.connect(str(self.paths.qmp)),
                                           max(0.1, deadline - time.monotonic()))
                    return
                except (QMPError, OSError, TimeoutError) as e:  # ConnectError wraps the OSError
                    if time.monotonic() > deadline:
                        raise QemuError(f"QMP connect failed: {e or 'no greeting'}") from e
            if time.monotonic() > deadline:
                raise QemuError("QMP socket did not appear")
            await asyncio.sleep(0.005)  # (a level 3 takeover waits on this)

    async def _pump_events(self, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        try:
            async for event in self.qmp.events:
                data = event.get("data", {})
                try:
                    on_event(str(event["event"]), data if isinstance(data, dict) else {})
                except Exception:  # noqa: BLE001 - one bad handler must not end the VM's event delivery
                    log.exception("%s: handling QEMU event %s", self.spec.name, event.get("event"))
        except (QMPError, OSError, EOFError):  # connection gone: the process watcher reports the exit
            pass

    def give(self, *paths: str | Path) -> None:
        """Files this QEMU is about to open (a node added while it runs): hand them to its user."""
        if self.run_as is not None:
            self.run_as.own(*paths)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One QMP command; every failure is a QmpError (callers catch QemuError, not Exception)."""
        try:
            return await self.qmp.execute(cmd, args)
        except ExecuteError as e:
            raise QmpError(cmd, str(e), e.error_class) from e
        except (QMPError, OSError, EOFError) as e:
            raise QmpError(cmd, f"QMP connection lost ({e or type(e).__name__})") from e

    async def disk_size(self, index: int) -> int:
        """The guest-visible size of disk `index` (its top node `disk<i>`), in bytes."""
        for n in await self.execute("query-named-block-nodes", {"flat": True}):
            if n.get("node-name") == f"disk{index}":
                return int(n["image"]["virtual-size"])
        raise RuntimeError(f"disk{index} not found")

    async def announce(self) -> None:
        """Tell the LAN where the VM's MACs now live (gratuitous RARP from QEMU)."""
        await self.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        """SIGKILL through the pidfd (never a recycled PID)."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def wait(self) -> int:
        code = await self.proc.wait()
        await self._cleanup()
        return code

    async def stop(self, grace: float, hurry: asyncio.Event | None = None) -> int:
        """Ask the guest to power off (the ACPI power button); after `grace` seconds, or
        as soon as `hurry` is set, quit QEMU; then kill. `stop_outcome` says which ended it."""
        self.stop_requested = True
        self.stop_outcome = "quit"
        try:
            if grace > 0:
                await self.execute("system_powerdown")
                waits = [asyncio.ensure_future(asyncio.shield(self.proc.wait()))]
                if hurry is not None:
                    waits.append(asyncio.ensure_future(hurry.wait()))
                _, pending = await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                if self.proc.returncode is not None:
                    self.stop_outcome = "guest"
                    return await self.wait()
                self.stop_outcome = "hurried" if hurry is not None and hurry.is_set() else "grace expired"
            await asyncio.wait_for(self.execute("quit"), 2.0)
        except (QemuError, TimeoutError):
            pass  # gone already, or hung: killed below
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), 5.0)
        except TimeoutError:
            self.stop_outcome = "killed"
            self.kill()
        return await self.wait()

    async def _cleanup(self) -> None:
        if self._event_task:
            self._event_task.cancel()
        try:
            await self.qmp.disconnect()
        except Exception:  # noqa: BLE001 - disconnect re-raises whatever ended the connection; taps and pidfd must still go
            pass
        for tap in self.taps:
            remove_tap(tap)
        try:
            os.close(self.pidfd)
        except OSError:
            pass
        self.pidfd = -1
        if isinstance(self.proc, keeper.Kept):
            self.proc.close()
