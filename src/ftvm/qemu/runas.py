"""The unprivileged user QEMU and qemu-storage-daemon run as (host.toml `qemu_user`,
made by setup.sh): a guest that escapes its QEMU lands in an account that owns only its
own VMs' files, under a seccomp sandbox.

The agent stays root (taps, namespaces, the fence guard). Before it starts a QEMU it
hands that user what the QEMU opens itself: its run directory, its disk images and RAM
file, and its taps (`ip tuntap add ... user`). What the agent opens on QEMU's behalf
(log files, listening sockets passed as descriptors) needs no hand-over.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_USER = "ftvm-qemu"
# QEMU's seccomp filter: no spawning, no privilege changes, no obsolete syscalls, no
# scheduler or resource changes from inside QEMU (the agent sets its priority before exec).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class RunAsError(RuntimeError):
    pass


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()   # e.g. kvm, for /dev/kvm

    @staticmethod
    def lookup(name: str) -> RunAs | None:
        """The user QEMU runs as; None for "root" (not recommended: said at start-up)."""
        if name == "root":
            return None
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise RunAsError(f"user {name!r} (qemu_user) does not exist: run setup.sh, or `useradd --system "
                             f"--no-create-home --shell /usr/sbin/nologin --groups kvm {name}`") from None
        groups = tuple(g.gr_gid for g in grp.getgrall() if name in g.gr_mem and g.gr_gid != pw.pw_gid)
        return RunAs(name, pw.pw_uid, pw.pw_gid, groups)

    def popen(self) -> dict[str, Any]:
        """subprocess arguments that start the process as this user, its files private."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups), "umask": 0o077}

    def own(self, *paths: str | Path) -> None:
        """Hand existing files or directories to this user (nothing else about them changes)."""
        for p in paths:
            if os.path.lexists(p):
                os.chown(p, self.uid, self.gid, follow_symlinks=False)

    def private_dir(self, d: Path) -> None:
        """A directory only this user (and root) can enter."""
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        self.own(d)


def popen_as(run_as: RunAs | None) -> dict[str, Any]:
    return run_as.popen() if run_as is not None else {"umask": 0o077}
