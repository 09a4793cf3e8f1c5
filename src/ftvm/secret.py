"""The pool secret: one random key every host of a pool holds, in a file only root reads.

It is made once, when the pool (or the lab) is made (`ftvm pool init`), and copied to each
host over a channel the administrator trusts (docs/security.md). Nothing uses it directly:
each channel gets its own key derived from it, so what QEMU is given (the NBD and
migration PSKs, readable by the unprivileged QEMU user) never reveals the secret itself or
another channel's key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

SECRET_BYTES = 32


class SecretError(ValueError):
    pass


def make_secret(path: Path) -> None:
    """A new secret at `path` (0600). Refuses to replace one: every host would need the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(SECRET_BYTES) + "\n")


def load_secret(path: Path) -> bytes:
    """The secret, if the file is private (no group or other access) and well-formed."""
    try:
        st = os.stat(path)
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cannot read the pool secret {path}: {getattr(e, 'strerror', None) or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"the pool secret {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                          f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"the pool secret {path} is not hex") from None
    if len(key) < SECRET_BYTES:
        raise SecretError(f"the pool secret {path} is too short ({len(key)} bytes, at least {SECRET_BYTES})")
    return key


def derive(secret: bytes, purpose: str) -> bytes:
    """The key of one channel ("checkpoint stream", "nbd", "migration", ...)."""
    return hmac.new(secret, b"ftvm key: " + purpose.encode(), hashlib.sha256).digest()
