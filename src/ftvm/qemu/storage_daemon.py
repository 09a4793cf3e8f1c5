"""The partner side of Level 2: a qemu-storage-daemon exporting this host's copy
of a VM's disks over NBD on the host's replication address.

Like QEMU, it dies with the agent (PR_SET_PDEATHSIG): a partner whose agent is
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
from dataclasses import replace
from pathlib import Path

from .blockgraph import COPY_AIO, LocalImage, NbdTarget
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


def build_qsd_cmdline(vm: str, images: list[LocalImage], listen_fd: int, tls_dir: Path) -> list[str]:
    """The daemon serves on a listening socket the agent made and passes in (fd), so the
    agent picks the port and sets TCP_NODELAY, which accepted sockets inherit: without it
    QEMU 7.2's NBD server delays its replies (Nagle) and large writes crawl."""
    cmd = [QSD, *QemuTls.qsd_objects(tls_dir)]  # only a client holding the NBD key gets past TLS
    for i, img in enumerate(images):
        # a write-through copy: NBD flushes need no fdatasync (writes were synchronous).
        # Written as the primary writes its copy (COPY_AIO): no hand-off to a worker thread
        # and back per request (measured, 1 MiB NBD writes, with the heap below: 1.40 -> 1.08 ms).
        cache = {"direct": True, "no-flush": img.write_through}
        cmd += ["--blockdev", json.dumps({"driver": "file", "node-name": f"f{i}", "filename": img.path,
                                          "cache": cache, "aio": COPY_AIO}),
                "--blockdev", json.dumps({"driver": img.format, "node-name": f"rep{i}", "file": f"f{i}"})]
    cmd += ["--nbd-server", f"addr.type=fd,addr.str={listen_fd},tls-creds={NBD_SERVER}"]
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


class StorageDaemon:
    def __init__(self, vm: str, proc: asyncio.subprocess.Process, addr: str, port: int,
                 images: list[LocalImage]) -> None:
        self.vm = vm
        self.proc = proc
        self.addr = addr
        self.port = port
        self.images = images
        self.disks = len(images)

    def exports(self) -> list[NbdTarget]:
        return [NbdTarget(self.addr, self.port, export_name(self.vm, i)) for i in range(self.disks)]

    @staticmethod
    async def start(vm: str, images: list[LocalImage], addr: str, log_path: Path, tls: QemuTls,
                    run_as: RunAs | None = None, tls_dir: Path | None = None) -> "StorageDaemon":
        listener = listening_socket(addr)
        port = int(listener.getsockname()[1])
        # its keys in a directory of its own, which its user can reach (the agent passes one
        # outside the VM's state directory: that may be the level 3 partner's, private to it)
        tls_dir = tls_dir or log_path.parent / "tls-export"
        tls_dir.parent.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            run_as.private_dir(tls_dir)
        tls.write(tls_dir, (run_as.uid, run_as.gid) if run_as else None)
        if run_as is not None:
            run_as.own(*(img.path for img in images))
        cmd = build_qsd_cmdline(vm, images, listener.fileno(), tls_dir)
        log.info("exporting %s on %s:%d: %s", vm, addr, port, " ".join(cmd))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(listener.fileno(),),
                    env=qsd_environment(dict(os.environ)),
                    preexec_fn=die_with_parent, start_new_session=True, **popen_as(run_as))
        finally:
            listener.close()  # the daemon has its own copy
        daemon = StorageDaemon(vm, proc, addr, port, images)
        for _ in range(100):  # ready once it greets (the kernel accepts on our listener before that)
            if proc.returncode is not None:
                raise StorageDaemonError(f"{QSD} exited (code {proc.returncode}); see {log_path}")
            with suppress(OSError), socket.create_connection((addr, port), timeout=0.2) as probe:
                probe.settimeout(0.2)
                if probe.recv(16, socket.MSG_WAITALL) == b"NBDMAGICIHAVEOPT":
                    return daemon
            await asyncio.sleep(0.05)
        await daemon.stop()
        raise StorageDaemonError(f"{QSD} for {vm} did not listen on {addr}:{port}")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                with suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
