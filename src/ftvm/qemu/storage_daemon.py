"""The partner side of Level 2: a process exporting this host's copy of a VM's disks over
NBD on the host's replication address: nbdkit with ftvm's filter where it can (no flush
round trip: qemu/copy_server.py), else qemu-storage-daemon.

It dies with the agent (PR_SET_PDEATHSIG): a partner whose agent is
gone stops serving, the primary sees its replica fail and records it outdated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
from contextlib import suppress
import struct
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from .blockgraph import COPY_AIO, LocalImage, NbdTarget
from .copy_server import NBDKIT, StableServer, nbdkit_cmdline, socket_activated
from .process import die_with_parent
from .runas import RunAs, popen_as
from .tls import NBD_SERVER, QemuTls
from .writethrough import clear_write_through, is_write_through, make_write_through

log = logging.getLogger(__name__)

QSD = "qemu-storage-daemon"


class StorageDaemonError(RuntimeError):
    pass


def export_name(vm: str, index: int) -> str:
    return f"{vm}-d{index}"


def build_qsd_cmdline(vm: str, images: list[LocalImage], server: str, tls_dir: Path | None = None) -> list[str]:
    """`server`: the --nbd-server address (and TLS). Facing the network, the daemon serves on
    a listening socket the agent made and passes in (fd), so the agent picks the port and
    sets TCP_NODELAY, which accepted sockets inherit: without it QEMU 7.2's NBD server
    delays its replies (Nagle) and large writes crawl. `tls_dir`: its TLS keys (only a
    client holding the NBD key gets past TLS); none behind nbdkit, on a private socket."""
    cmd = [QSD, *(QemuTls.qsd_objects(tls_dir) if tls_dir is not None else [])]
    for i, img in enumerate(images):
        # a write-through copy: NBD flushes need no fdatasync (writes were synchronous).
        # Written as the primary writes its copy (COPY_AIO): no hand-off to a worker thread
        # and back per request (measured, 1 MiB NBD writes, with the heap below: 1.40 -> 1.08 ms).
        cache = {"direct": True, "no-flush": img.write_through}
        cmd += ["--blockdev", json.dumps({"driver": "file", "node-name": f"f{i}", "filename": img.path,
                                          "cache": cache, "aio": COPY_AIO}),
                "--blockdev", json.dumps({"driver": img.format, "node-name": f"rep{i}", "file": f"f{i}"})]
    cmd += ["--nbd-server", server]
    for i in range(len(images)):
        cmd += ["--export", f"type=nbd,id=e{i},node-name=rep{i},name={export_name(vm, i)},writable=on"]
    return cmd


# QEMU's NBD server allocates a buffer per write request. glibc serves allocations above
# its mmap threshold with a fresh mmap, so every large write faulted in (zeroed) new pages
# and unmapped them after the reply. From the heap, and kept there, buffers are reused.
# 32 MiB: the largest NBD request, and glibc's ceiling for the threshold.
QSD_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def qsd_environment(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (base.get("GLIBC_TUNABLES", ""), QSD_MALLOC_TUNABLES) if t)
    return env


def listening_socket(addr: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((addr, 0))
    sock.listen(16)
    return sock


def ensure_image(image: LocalImage, size: int) -> bool:
    """Create an empty copy if there is none. Returns True if it was created."""
    if Path(image.path).exists():
        return False
    Path(image.path).parent.mkdir(parents=True, exist_ok=True)
    # Space reserved up front (fallocate; qcow2: its clusters too): a copy never fails later on
    # a full file system (that would outdate a replica, or stop the guest), and no block or
    # cluster allocation happens on the synchronous write path (measured: within the noise).
    opts = ["-o", "preallocation=falloc"]
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", image.format, *opts, image.path, str(size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StorageDaemonError(f"qemu-img create {image.path}: {proc.stderr.strip()}")
    os.chmod(image.path, 0o600)  # a guest's disk is no one else's to read
    return True


def writable_copy(image: LocalImage, want_write_through: bool) -> LocalImage:
    """The copy as its nodes may open it: write-through (flushes skipped) only if wanted and
    verified on the file now. Called right before nodes or a daemon open the file, since
    a copy made again (a replaced disk) starts without the attribute. Not wanted (the host
    turned it off: its agent restarted, and its QEMUs with it): the attribute is cleared."""
    if not want_write_through:
        if clear_write_through(image.path):
            log.info("%s: write-through turned off for this host: synchronous-write attribute cleared", image.path)
        return replace(image, write_through=False)
    ok = make_write_through(image.path)
    if not ok:
        log.warning("%s: the file system does not keep the synchronous-write attribute; "
                    "the copy is flushed as usual", image.path)
    return replace(image, write_through=ok)


def restore_write_through(images: list[LocalImage]) -> list[str]:
    """Write-through copies whose attribute was cleared behind our back (`chattr -S`, a
    restored file): set it again, which also syncs what was written meanwhile. Returns
    the paths that needed it. Their nodes skip flushes, so this must not stay unnoticed."""
    fixed = []
    for image in images:
        if image.write_through and os.path.exists(image.path) and not is_write_through(image.path):
            make_write_through(image.path)
            fixed.append(image.path)
    return fixed


def import_image(source: str, source_format: str, image: LocalImage) -> None:
    """A level 2 or 3 VM's first copy, made from an existing image (the partner's is then
    resynced in full)."""
    Path(image.path).parent.mkdir(parents=True, exist_ok=True)
    opts = ["-o", "preallocation=metadata"] if image.format == "qcow2" else []
    proc = subprocess.run(["qemu-img", "convert", "-q", "-f", source_format, "-O", image.format, *opts,
                           source, image.path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StorageDaemonError(f"importing {source}: {proc.stderr.strip()}")
    os.chmod(image.path, 0o600)
    if image.format == "raw":  # space reserved as for an empty copy (ensure_image)
        with open(image.path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def image_size(image: LocalImage) -> int:
    proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", image.format, image.path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StorageDaemonError(f"qemu-img info {image.path}: {proc.stderr.strip()}")
    return int(json.loads(proc.stdout)["virtual-size"])


def export_links(links_dir: Path, vm: str, images: list[LocalImage]) -> None:
    """nbdkit's file plugin serves a directory's files under their names: one link per
    disk, named as qemu-storage-daemon names its exports, to the copy."""
    links_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in links_dir.iterdir():
        old.unlink()
    for i, img in enumerate(images):
        (links_dir / export_name(vm, i)).symlink_to(os.path.abspath(img.path))


async def _spawn(cmd: list[str], log_path: Path, run_as: RunAs | None,
                 pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
    with open(log_path, "ab") as out:
        return await asyncio.create_subprocess_exec(
            *cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=pass_fds,
            env=qsd_environment(dict(os.environ)),
            preexec_fn=die_with_parent, start_new_session=True, **popen_as(run_as))


NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_OPT_ABORT = 2


async def nbd_answers(opened: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                      timeout: float = 0.5) -> bool:
    """An NBD server greets within `timeout` once connected (`opened`). A connection alone
    is not enough: the kernel accepts for a server that is frozen or hung."""
    try:
        reader, writer = await asyncio.wait_for(opened, timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        greeting = await asyncio.wait_for(reader.readexactly(18), timeout)
        if greeting[:16] != b"NBDMAGICIHAVEOPT":
            return False
        # end the handshake as the protocol asks (client flags, then NBD_OPT_ABORT): a bare
        # close makes the server log "option negotiation failed" at every probe
        writer.write(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE) + b"IHAVEOPT" + struct.pack(">II", NBD_OPT_ABORT, 0))
        with suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readexactly(20), timeout)  # the server's acknowledgement
        return True
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _greets(proc: asyncio.subprocess.Process, opener: Opener, what: str, log_path: Path) -> bool:
    """Wait until the server sends its NBD greeting (the kernel accepts before that)."""
    for _ in range(100):
        if proc.returncode is not None:
            raise StorageDaemonError(f"{what} exited (code {proc.returncode}); see {log_path}")
        if await nbd_answers(opener(), 0.2):
            return True
        await asyncio.sleep(0.05)
    return False


class StorageDaemon:
    """The process(es) serving a VM's copies: the one facing the network first (nbdkit, or
    qemu-storage-daemon alone), then any behind it (qemu-storage-daemon on a Unix socket,
    serving qcow2 copies to nbdkit)."""

    def __init__(self, vm: str, procs: list[asyncio.subprocess.Process], addr: str, port: int,
                 images: list[LocalImage], kind: str = QSD) -> None:
        self.vm = vm
        self.procs = procs
        self.addr = addr
        self.port = port
        self.images = images
        self.disks = len(images)
        self.kind = kind  # which server faces the network: NBDKIT or QSD
        self.inner: Path | None = None   # the Unix socket of a qemu-storage-daemon behind nbdkit
        self.hung = ""                   # why the agent killed the servers (else "")
        self._watch: asyncio.Task[None] | None = None

    def exports(self) -> list[NbdTarget]:
        return [NbdTarget(self.addr, self.port, export_name(self.vm, i)) for i in range(self.disks)]

    @staticmethod
    async def start(vm: str, images: list[LocalImage], addr: str, log_path: Path, tls: QemuTls,
                    run_as: RunAs | None = None, tls_dir: Path | None = None,
                    stable: StableServer | None = None) -> "StorageDaemon":
        """`stable`: nbdkit and ftvm's filter face the network (qemu/copy_server.py): over
        the raw copies themselves, or over a qemu-storage-daemon serving qcow2 ones on a
        Unix socket. Else qemu-storage-daemon alone."""
        # its keys in a directory of its own, which its user can reach (the agent passes one
        # outside the VM's state directory: that may be the level 3 partner's, private to it)
        tls_dir = tls_dir or log_path.parent / "tls-export"
        tls_dir.parent.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            run_as.private_dir(tls_dir)
        tls.write(tls_dir, (run_as.uid, run_as.gid) if run_as else None)
        if run_as is not None:
            run_as.own(*(img.path for img in images))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        procs: list[asyncio.subprocess.Process] = []
        daemon = StorageDaemon(vm, procs, addr, 0, images, NBDKIT if stable is not None else QSD)
        try:
            if stable is None:
                plugin: list[str] = []
            elif all(img.format == "raw" for img in images):
                links = tls_dir / "copies"
                export_links(links, vm, images)
                if run_as is not None:
                    run_as.own(links)
                plugin = ["file", f"dir={links}"]
            else:  # qcow2: nbdkit cannot write it, qemu-storage-daemon behind it does
                inner = tls_dir / "qsd.sock"
                inner.unlink(missing_ok=True)
                cmd = build_qsd_cmdline(vm, images, f"addr.type=unix,addr.path={inner}")
                log.info("serving %s's copies to nbdkit on %s: %s", vm, inner, " ".join(cmd))
                procs.append(await _spawn(cmd, log_path, run_as))
                if not await _greets(procs[-1], lambda: asyncio.open_unix_connection(str(inner)), QSD, log_path):
                    raise StorageDaemonError(f"{QSD} for {vm} did not listen on {inner}")
                plugin = ["nbd", f"socket={inner}", "dynamic-export=true"]
                daemon.inner = inner
            listener = listening_socket(addr)
            daemon.port = port = int(listener.getsockname()[1])
            try:
                fd = listener.fileno()
                if stable is None:
                    cmd = build_qsd_cmdline(vm, images, f"addr.type=fd,addr.str={fd},tls-creds={NBD_SERVER}",
                                            tls_dir)
                else:
                    cmd = socket_activated(nbdkit_cmdline(stable, plugin, tls_dir / "nbd" / "keys.psk"), fd)
                log.info("exporting %s on %s:%d: %s", vm, addr, port, " ".join(cmd))
                procs.insert(0, await _spawn(cmd, log_path, run_as, (fd,)))
            finally:
                listener.close()  # the server has its own copy
            if await _greets(procs[0], lambda: asyncio.open_connection(addr, port), daemon.kind, log_path):
                if daemon.inner is not None:
                    daemon._watch = asyncio.create_task(daemon._watch_inner(), name=f"export-watch-{vm}")
                return daemon
            raise StorageDaemonError(f"{daemon.kind} for {vm} did not listen on {addr}:{port}")
        except BaseException:
            await daemon.stop()
            raise

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.returncode is None for p in self.procs)

    async def _watch_inner(self) -> None:
        """The owner's probe sees nbdkit greet even when the daemon behind it hangs, while its
        writes to this copy wait forever. So the daemon is probed here, and a hung one (no
        greeting twice in a row, 1 s apart) ends both servers: the owner's writes fail, its
        replica is masked and recorded outdated, as for a partner whose server died."""
        assert self.inner is not None
        misses = 0
        while self.alive:
            await asyncio.sleep(1.0)
            misses = 0 if await nbd_answers(asyncio.open_unix_connection(str(self.inner))) else misses + 1
            if misses >= 2:
                self.hung = f"{QSD} behind nbdkit stopped answering"
                log.warning("%s: %s: stopping its servers", self.vm, self.hung)
                for proc in self.procs:
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                return

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for proc in self.procs:  # the one facing the network first
            if proc.returncode is None:
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except asyncio.TimeoutError:
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    await proc.wait()
