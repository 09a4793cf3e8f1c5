"""TLS for QEMU's own channels between hosts: NBD (level 2 copies) and live migration.

QEMU's `tls-creds-psk`: each side holds a keys.psk file of `identity:hexkey` lines; a
peer that does not know the key fails the TLS handshake before any NBD option or
migration byte is accepted. Each channel has its own key, derived from the pool secret
(ftvm/secret.py), so what QEMU can read never reveals the secret or another channel's key.

The server's file holds exactly one identity. That is what authenticates: QEMU 7.2's
`tls-authz` does not check a PSK client's identity (verified here: a client with another
identity whose key was also in the server's file was let in), so no authz object is used
and no second identity is ever written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..secret import derive

NBD_CLIENT = "ftvm-nbd"            # object ids, in every QEMU and storage daemon ftvm starts
NBD_SERVER = "ftvm-nbd-in"
MIGRATION_CLIENT = "ftvm-mig-out"
MIGRATION_SERVER = "ftvm-mig-in"
_CHANNELS = {"nbd": "ftvm-nbd", "migration": "ftvm-migration"}  # channel -> PSK identity


@dataclass(frozen=True)
class QemuTls:
    keys: dict[str, bytes]  # channel -> key

    @staticmethod
    def from_secret(secret: bytes) -> QemuTls:
        return QemuTls({ch: derive(secret, f"qemu {ch}") for ch in _CHANNELS})

    def write(self, d: Path, owner: tuple[int, int] | None = None) -> None:
        """d/<channel>/keys.psk, 0600 (owned by `owner` (uid, gid): the user QEMU runs as)."""
        for ch, identity in _CHANNELS.items():
            sub = d / ch
            sub.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = sub / "keys.psk"
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{identity}:{self.keys[ch].hex()}\n")
            if owner is not None:
                for p in (d, sub, tmp):
                    os.chown(p, *owner)
            os.replace(tmp, path)

    @staticmethod
    def qemu_objects(d: Path) -> list[str]:
        """A guest's QEMU: NBD client (to partners' copies), migration source and target."""
        return ["-object", f"tls-creds-psk,id={NBD_CLIENT},dir={d / 'nbd'},endpoint=client,"
                           f"username={_CHANNELS['nbd']}",
                "-object", f"tls-creds-psk,id={MIGRATION_CLIENT},dir={d / 'migration'},endpoint=client,"
                           f"username={_CHANNELS['migration']}",
                "-object", f"tls-creds-psk,id={MIGRATION_SERVER},dir={d / 'migration'},endpoint=server"]

    @staticmethod
    def qsd_objects(d: Path) -> list[str]:
        """A storage daemon serving this host's copy: NBD server."""
        return ["--object", f"tls-creds-psk,id={NBD_SERVER},dir={d / 'nbd'},endpoint=server"]
