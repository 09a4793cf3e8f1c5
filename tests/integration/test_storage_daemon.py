"""The partner's qemu-storage-daemon as ftvm starts it (real qsd, real NBD on loopback):
it accepts the I/O mode and heap settings it is given and serves writes that land in the copy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ftvm.qemu.tls import QemuTls
from ftvm.qemu.storage_daemon import (QSD_MALLOC_TUNABLES, StorageDaemon, ensure_image, qsd_environment,
                                      writable_copy)
from ftvm.qemu.blockgraph import LocalImage


def test_existing_tunables_are_kept() -> None:
    env = qsd_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert env["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{QSD_MALLOC_TUNABLES}"
    assert env["PATH"] == "/bin"
    assert qsd_environment({})["GLIBC_TUNABLES"] == QSD_MALLOC_TUNABLES


def _qemu_io(*args: str) -> str:
    proc = subprocess.run(["qemu-io", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_writes_over_nbd_land_in_the_copy(tmp_path: Path, fmt: str) -> None:
    image = LocalImage(str(tmp_path / f"copy.{fmt}"), fmt)
    assert ensure_image(image, 64 << 20)
    image = writable_copy(image, True)
    tls = QemuTls.from_secret(os.urandom(32))
    daemon = await StorageDaemon.start("web", [image], "127.0.0.1", tmp_path / "export.log", tls)
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
        _qemu_io("--object", creds, "--image-opts", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 1M 1M",
                 "-c", "flush", url)
    finally:
        await daemon.stop()
    assert not daemon.alive
    out = _qemu_io("-f", fmt, "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 1M 1M", "-c", "read -P 0 2M 1M",
                   image.path)
    assert out.count("read 1048576/1048576") == 3
    assert os.path.getsize(image.path) > 0
