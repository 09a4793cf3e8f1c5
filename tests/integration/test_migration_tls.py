"""A live-migration target as ftvm sets it up (real QEMU, TCP on loopback, TLS-PSK from
qemu/tls.py): a source with the pool's key migrates in; a plain stream and one with
another key are refused, and the refused target never runs the state it was sent."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

from ftvm.qemu.cmdline import listening_socket, monitor
from ftvm.qemu.process import set_migration_tls
from ftvm.qemu.tls import MIGRATION_CLIENT, MIGRATION_SERVER, QemuTls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Qemu:
    """A guestless QEMU (no devices, 32 MiB, firmware only), driven over QMP."""

    def __init__(self, d: Path, name: str, tls_dir: Path | None, incoming: bool) -> None:
        self.sock = d / f"{name}.qmp"
        mon = listening_socket(self.sock)  # (non-blocking: see qemu/cmdline.monitor)
        cmd = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "32", "-nodefaults", "-display", "none",
               *monitor(self.sock, "m", mon, wait=True)]
        if tls_dir is not None:
            cmd += QemuTls.qemu_objects(tls_dir)
        if incoming:
            cmd += ["-incoming", "defer"]
        self.log = d / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stderr=log, pass_fds=[mon])
        os.close(mon)
        self.qmp = QMPClient(name)

    async def connect(self) -> None:
        while True:  # until QEMU listens (it may be slow to start on a loaded machine)
            if self.proc.poll() is not None:
                raise AssertionError(self.log.read_text())
            try:
                await self.qmp.connect(str(self.sock))
                return
            except ConnectError:
                await asyncio.sleep(0.05)

    async def migration_status(self) -> str:
        """The migration's final state (QEMU's own, not a timer)."""
        while True:
            status = (await self.qmp.execute("query-migrate")).get("status", "none")
            if status not in ("setup", "active", "none", "device", "pre-switchover"):
                return str(status)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        try:
            await self.qmp.disconnect()
        finally:
            self.proc.kill()
            self.proc.wait()


async def _migrate(tmp: Path, source_tls: Path | None, target_tls: Path) -> tuple[str, str, str]:
    """(source's final status, target's run state, what the target logged)."""
    port = _free_port()
    target = _Qemu(tmp, "target", target_tls, incoming=True)
    source = _Qemu(tmp, "source", source_tls, incoming=False)
    try:
        await target.connect()
        await source.connect()
        await set_migration_tls(target.qmp, MIGRATION_SERVER)
        await target.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        await set_migration_tls(source.qmp, MIGRATION_CLIENT if source_tls else "")
        await source.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        src_status = await source.migration_status()
        # accepted: the target runs on with the source's state; refused: QEMU logs the failed
        # handshake and keeps waiting for a migration, having loaded nothing
        while True:
            status = str((await target.qmp.execute("query-status"))["status"])
            if status != "inmigrate" or "TLS handshake failed" in target.log.read_text():
                return src_status, status, target.log.read_text()
            await asyncio.sleep(0.05)
    finally:
        await source.close()
        await target.close()


async def test_only_a_source_with_the_pools_key_migrates_in(tmp_path: Path) -> None:
    pool = QemuTls.from_secret(os.urandom(32))
    pool.write(tmp_path / "pool-tls")
    other = QemuTls.from_secret(os.urandom(32))
    other.write(tmp_path / "other-tls")
    src, tgt, _ = await _migrate(tmp_path, tmp_path / "pool-tls", tmp_path / "pool-tls")
    assert (src, tgt) == ("completed", "running"), (src, tgt)
    for source_tls in (None, tmp_path / "other-tls"):  # a plain stream, another key
        src, tgt, log = await _migrate(tmp_path, source_tls, tmp_path / "pool-tls")
        assert (src, tgt) == ("failed", "inmigrate"), (source_tls, src, tgt, log)
        assert "TLS handshake failed" in log
