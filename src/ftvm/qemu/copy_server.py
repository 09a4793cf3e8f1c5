"""How a level 2 partner serves its copy: nbdkit with the ftvm-stable filter where it can,
else qemu-storage-daemon.

Why two: a guest's synchronous write on a mirrored disk is a write and then a flush, and
QEMU's NBD client sends the flush to the partner whenever the server offers FLUSH, which
qemu-storage-daemon always does (measured on a 10 ms metro link: 23.5 ms per O_DSYNC write
over the unprotected disk, two round trips). nbdkit's file plugin under ftvm's filter
(stable_filter.c) makes every write stable before it is answered and offers no FLUSH, so
the same write costs one round trip. nbdkit writes raw files itself; qcow2 copies it passes
to a qemu-storage-daemon on a Unix socket (its nbd plugin), which does the format.

The filter is compiled here, once per source version, against nbdkit-plugin-dev
(setup.sh installs it). Without nbdkit, its headers or a compiler, copies are served by
qemu-storage-daemon and the agent says so at start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NBDKIT = "nbdkit"
FILTER_SRC = Path(__file__).parent / "stable_filter.c"
FILTER_HEADER = Path("/usr/include/nbdkit-filter.h")


@dataclass(frozen=True)
class StableServer:
    """nbdkit, and the filter it loads (a shared object readable by QEMU's user)."""

    filter_path: Path


def build_stable_filter(lib_dir: Path) -> tuple[StableServer | None, str]:
    """The filter built under `lib_dir` (reused while its source is unchanged), and a
    sentence for the agent's log saying which server level 2 copies get."""
    if shutil.which(NBDKIT) is None:
        return None, "level 2 copies served by qemu-storage-daemon (nbdkit not installed: run setup.sh)"
    if not FILTER_HEADER.exists():
        return None, "level 2 copies served by qemu-storage-daemon (nbdkit-plugin-dev not installed: run setup.sh)"
    source = FILTER_SRC.read_bytes()
    target = lib_dir / f"ftvm-stable-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not target.exists():
        lib_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(lib_dir, 0o755)  # QEMU's user loads it; only root may replace it
        tmp = target.with_suffix(".tmp")
        proc = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wno-unused-parameter",
                               "-o", str(tmp), str(FILTER_SRC)], capture_output=True, text=True)
        if proc.returncode != 0:
            return None, ("level 2 copies served by qemu-storage-daemon (building the nbdkit filter failed: "
                          f"{proc.stderr.strip()[-300:]})")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    return StableServer(target), "level 2 copies served by nbdkit (writes stable when answered, no flush round trip)"


def nbdkit_cmdline(server: StableServer, plugin: list[str], psk_file: Path) -> list[str]:
    """nbdkit with `plugin` and its parameters (the file plugin over a directory of links to
    raw copies, or the nbd plugin passing export names through to a qemu-storage-daemon);
    on the listening socket passed as descriptor 3 (socket activation); only to a client
    holding the NBD key (TLS-PSK, the same key file as qemu-storage-daemon's)."""
    return [NBDKIT, "--exit-with-parent", "--tls=require", f"--tls-psk={psk_file}",
            f"--filter={server.filter_path}", *plugin]


def socket_activated(cmd: list[str], listen_fd: int) -> list[str]:
    """`cmd` run by bash, which moves `listen_fd` to descriptor 3 and sets LISTEN_PID to
    its own pid, which `exec` hands to `cmd` (nbdkit checks both)."""
    move = "" if listen_fd == 3 else f"exec 3<&{listen_fd} {listen_fd}<&-; "
    script = move + 'LISTEN_FDS=1 LISTEN_PID=$$ exec "$@"'
    return ["/bin/bash", "-c", script, "bash", *cmd]  # (dash cannot name descriptors above 9)
