"""The partner's copy server as ftvm starts it (real qemu-storage-daemon and nbdkit, real NBD
with TLS on loopback): it serves writes that land in the copy, to the key holder only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ftvm.qemu.tls import QemuTls
from ftvm.qemu.copy_server import NBDKIT, build_stable_filter, socket_activated
from ftvm.qemu.storage_daemon import (QSD, QSD_MALLOC_TUNABLES, StorageDaemon, ensure_image, qsd_environment,
                                      writable_copy)
from ftvm.qemu.blockgraph import LocalImage


def test_existing_tunables_are_kept() -> None:
    env = qsd_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert env["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{QSD_MALLOC_TUNABLES}"
    assert env["PATH"] == "/bin"
    assert qsd_environment({})["GLIBC_TUNABLES"] == QSD_MALLOC_TUNABLES


def _qemu_io(*args: str) -> str:
    """Its output, with any trace lines asked for (QEMU writes them to stderr)."""
    proc = subprocess.run(["qemu-io", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("fmt,server", [("raw", QSD), ("qcow2", QSD), ("raw", NBDKIT), ("qcow2", NBDKIT)])
async def test_writes_over_nbd_land_in_the_copy(tmp_path: Path, fmt: str, server: str) -> None:
    """Either server; nbdkit writes raw copies itself and passes qcow2 ones to a qsd behind it."""
    image = LocalImage(str(tmp_path / f"copy.{fmt}"), fmt)
    assert ensure_image(image, 64 << 20)
    image = writable_copy(image, True)
    tls = QemuTls.from_secret(os.urandom(32))
    stable = None
    if server == NBDKIT:
        stable, why = build_stable_filter(tmp_path / "lib")
        assert stable is not None, why
    daemon = await StorageDaemon.start("web", [image], "127.0.0.1", tmp_path / "export.log", tls, stable=stable)
    assert daemon.kind == server and len(daemon.procs) == (2 if (server, fmt) == (NBDKIT, "qcow2") else 1)
    try:
        export = daemon.exports()[0]
        tls.write(tmp_path / "client-tls")
        creds = QemuTls.qemu_objects(tmp_path / "client-tls")[1]  # the NBD client's object
        url = (f"driver=raw,file.driver=nbd,file.host={export.host},file.port={export.port},"
               f"file.export={export.name},file.tls-creds=ftvm-nbd")
        # without the key: refused before any NBD option (no TLS, or TLS with another key); the
        # region they tried to write is read back as zeros below
        wrong = QemuTls.from_secret(os.urandom(32))
        wrong.write(tmp_path / "wrong-tls")
        for objects in ([], ["--object", QemuTls.qemu_objects(tmp_path / "wrong-tls")[1]]):
            target = url if objects else url.replace(",file.tls-creds=ftvm-nbd", "")
            proc = subprocess.run(["qemu-io", *objects, "--image-opts", "-c", "write -P 0x66 2M 1M", target],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode != 0 or "error" in (proc.stdout + proc.stderr).lower(), proc.stdout
            assert "wrote" not in proc.stdout
        # 1 MiB writes (the size that used to cost a fresh mmap per request) and a flush
        out = _qemu_io("--trace", "nbd_receive_negotiate_size_flags", "--trace", "nbd_send_request",
                       "--object", creds, "--image-opts", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 1M 1M",
                       "-c", "flush", url)
        # nbdkit offers no FLUSH (each write is stable when answered), so QEMU sends none
        flushes = out.count("(flush)")
        assert flushes == 0 if daemon.kind == NBDKIT else flushes >= 1, out
    finally:
        await daemon.stop()
    assert not daemon.alive and all(p.returncode is not None for p in daemon.procs)
    out = _qemu_io("-f", fmt, "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 1M 1M", "-c", "read -P 0 2M 1M",
                   image.path)
    assert out.count("read 1048576/1048576") == 3
    assert os.path.getsize(image.path) > 0


def test_the_filter_is_built_once_per_source_version(tmp_path: Path) -> None:
    first, _ = build_stable_filter(tmp_path)
    assert first is not None and first.filter_path.exists()
    made = first.filter_path.stat().st_mtime_ns
    again, _ = build_stable_filter(tmp_path)
    assert again == first and again.filter_path.stat().st_mtime_ns == made
    assert oct(first.filter_path.stat().st_mode & 0o777) == "0o644"


def test_socket_activation_hands_the_listener_over_as_descriptor_3() -> None:
    r, w = os.pipe()
    try:
        script = socket_activated(["sh", "-c", 'echo "$LISTEN_FDS $LISTEN_PID $$"; [ -e /proc/self/fd/3 ] && echo ok; '
                                               f'[ -e /proc/self/fd/{r} ] || echo moved'], r)
        proc = subprocess.run(script, capture_output=True, text=True, pass_fds=(r,), timeout=10)
    finally:
        os.close(r)
        os.close(w)
    lines = proc.stdout.split("\n")
    fds, pid, own = lines[0].split()
    assert fds == "1" and pid == own and lines[1:3] == ["ok", "moved"], proc.stdout + proc.stderr
    assert "exec 3<&" not in socket_activated(["true"], 3)[2]  # already 3: left where it is
