"""Level 3: the exact set of guest RAM pages written since the last checkpoint, from the
kernel, without comparing pages (FACTS.md, "Exact dirty-page tracking").

    QEMU (its own user)                       agent (root)
    uffd_shim.so constructor:                 WriteTracker.attach(pid, pidfd, ram file):
      userfaultfd(USER_MODE_ONLY),              pidfd_getfd -> a copy of that uffd
      UFFDIO_API (WP_ASYNC, WP_UNPOPULATED),    /proc/PID/maps -> the RAM file's mapping
      fd moved to SHIM_FD                       UFFDIO_REGISTER (MODE_WP), UFFDIO_WRITEPROTECT
    guest writes a page: the kernel lifts   each epoch, guest stopped: PAGEMAP_SCAN on
      its write protection, marks it          /proc/PID/pagemap (PAGE_IS_WRITTEN, re-protect
      written; QEMU never waits               what it reports, in the same call)

Async mode never blocks QEMU: there is no fault handler, and the agent dying changes
nothing for the guest. A scan costs well under a millisecond at 256 MiB (FACTS.md: 0.2 ms
at 256 MiB, 0.7 ms at 1 GiB), against ~25 ms/~87 ms for a full compare.

What the tracker cannot see, and so must never write guest RAM: another process mapping
the RAM file (only the standby's QEMU maps a replica, never the primary's file), `write()`
to the file, hole punching (QEMU does it for balloon and virtio-mem discards: ftvm gives
level 3 guests neither device), DMA into pinned pages (no VFIO). A scan that fails has
already re-protected part of what it matched: the caller then treats every page as
written (l3/pages.py).

`python -m ftvm.l3.writes` probes this host and prints the verdict.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..qemu.runas import RunAs

PAGE = 4096
SHIM_SOURCE = Path(__file__).with_name("uffd_shim.c")
SHIM_FD = 1021              # where the shim leaves the descriptor in QEMU (far above QEMU's own)
SHIM_ENV = "FTVM_UFFD_FD"
UFFD_LINK = "anon_inode:[userfaultfd]"

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (a syscall added after the table merge)


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):  # struct pm_scan_arg (kernel 6.7+; Debian 12's headers lack it)
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):  # struct page_region
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


UFFDIO_REGISTER = _iowr(0xAA, 0x00, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = (2 << 30) | (ctypes.sizeof(_Range) << 16) | (0xAA << 8) | 0x01  # _IOR
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, ctypes.sizeof(_WriteProtect))
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_ScanArg))
REGISTER_MODE_WP = 1 << 1
WRITEPROTECT_MODE_WP = 1 << 0
PM_SCAN_WP_MATCHING = 1 << 0     # re-protect the pages it reports, in the same walk
PM_SCAN_CHECK_WPASYNC = 1 << 1   # refuse a range not registered in async mode
PAGE_IS_WRITTEN = 1 << 1
SCAN_REGIONS = 512               # regions per PAGEMAP_SCAN call (it stops early past them)


class TrackerError(OSError):
    """The kernel could not register or scan: the caller compares pages instead."""


def _ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
    r = int(_libc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg)))
    if r < 0:
        e = ctypes.get_errno()
        raise TrackerError(e, f"{what}: {os.strerror(e)}")
    return r


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    fd = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd < 0:
        e = ctypes.get_errno()
        raise TrackerError(e, f"pidfd_getfd of QEMU's fd {target_fd}: {os.strerror(e)}")
    os.set_inheritable(fd, False)
    return fd


def _mapping_of(pid: int, path: Path) -> tuple[int, int, int]:
    """(start, end, file offset) of the one mapping of `path` in process `pid`."""
    st = os.stat(path)
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 5 or int(fields[4]) != st.st_ino:
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if os.makedev(major, minor) != st.st_dev:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "s" not in fields[1]:
                raise TrackerError(0, f"{path} is mapped private in QEMU (share=on expected)")
            found.append((start, end, int(fields[2], 16)))
    if len(found) != 1:
        raise TrackerError(0, f"{path} is mapped {len(found)} times in QEMU (one expected)")
    return found[0]


class WriteTracker:
    """The written pages of one file's mapping in one QEMU, epoch after epoch."""

    def __init__(self, pid: int, uffd: int, start: int, end: int, offset: int) -> None:
        self.pid, self.uffd = pid, uffd
        self.start, self.end, self.first_page = start, end, offset // PAGE
        self.npages = (end - start) // PAGE
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._vec = (_Region * SCAN_REGIONS)()
        self.scans = 0
        self.scan_seconds = 0.0

    @staticmethod
    def attach(pid: int, pidfd: int, path: Path) -> WriteTracker:
        """Track QEMU `pid`'s mapping of `path` (its RAM file): every page write-protected
        from now on, so the first scan reports what was written after this call."""
        return WriteTracker._attach(pid, pidfd, lambda: _mapping_of(pid, path),
                                    f"QEMU has no userfaultfd from the shim at fd {SHIM_FD} (started without it?)")

    @staticmethod
    def _attach(pid: int, pidfd: int, mapping: Callable[[], tuple[int, int, int]], no_shim: str) -> WriteTracker:
        """The shim's userfaultfd taken from `pid`, `mapping()` (start, end, file offset)
        registered and write-protected."""
        if not _has_shim_fd(pid):
            raise TrackerError(0, no_shim)
        uffd = pidfd_getfd(pidfd, SHIM_FD)
        try:
            start, end, offset = mapping()
            tracker = WriteTracker(pid, uffd, start, end, offset)
        except BaseException:
            os.close(uffd)
            raise
        try:
            _ioctl(uffd, UFFDIO_REGISTER, _Register(_Range(start, end - start), REGISTER_MODE_WP, 0),
                   "UFFDIO_REGISTER")
            tracker.arm()
        except BaseException:
            tracker.close()
            raise
        return tracker

    def arm(self) -> None:
        """Write-protect every page: from here on, each written page is reported once."""
        _ioctl(self.uffd, UFFDIO_WRITEPROTECT, _WriteProtect(_Range(self.start, self.end - self.start),
                                                              WRITEPROTECT_MODE_WP), "UFFDIO_WRITEPROTECT")

    def scan(self) -> np.ndarray:
        """File page numbers written since the last scan (or `arm`), in order, re-protected.
        TrackerError if the walk failed: part of it may be re-protected already, so the
        caller must take every page as written (and `arm` again)."""
        t0 = time.perf_counter()
        parts: list[np.ndarray] = []
        at = self.start
        vec = self._vec
        while at < self.end:
            arg = _ScanArg(ctypes.sizeof(_ScanArg), PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, at, self.end, 0,
                           ctypes.addressof(vec), SCAN_REGIONS, 0, 0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN)
            n = _ioctl(self._pagemap, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            for i in range(n):
                first = (vec[i].start - self.start) // PAGE + self.first_page
                parts.append(np.arange(first, first + (vec[i].end - vec[i].start) // PAGE, dtype=np.int64))
            if arg.walk_end <= at:
                raise TrackerError(0, f"PAGEMAP_SCAN made no progress at {at:#x}")
            at = int(arg.walk_end)
        self.scans += 1
        self.scan_seconds += time.perf_counter() - t0
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def close(self) -> None:
        """Stop tracking (QEMU keeps its own descriptor; pages left protected cost it one
        fault each, once)."""
        try:
            r = _Range(self.start, self.end - self.start)
            _libc.ioctl(self.uffd, ctypes.c_ulong(UFFDIO_UNREGISTER), ctypes.byref(r))
        finally:
            os.close(self._pagemap)
            os.close(self.uffd)


# --- the shim, and whether this host can track ----------------------------------------------

def shim_dir() -> Path:
    return Path(os.environ.get("FTVM_CACHE", "/var/cache/ftvm")) / "uffd-shim"


def build_shim(root: Path | None = None) -> Path:
    """The shim, compiled from uffd_shim.c once per source (kept by digest), readable by
    QEMU's user. TrackerError if it cannot be built (no C compiler: `setup.sh` installs gcc)."""
    source = SHIM_SOURCE.read_bytes()
    digest = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    root = root or shim_dir()
    out = root / digest / "ftvm-uffd.so"
    if out.is_file():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise TrackerError(0, "no C compiler to build the dirty-page tracking shim (install gcc)")
    _make_readable_dirs(out.parent)  # QEMU's user loads it
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / "ftvm-uffd.so"
        proc = subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(built), str(SHIM_SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TrackerError(0, f"building the tracking shim failed: {proc.stderr.strip()[-300:]}")
        os.chmod(built, 0o644)
        os.replace(built, out)
    return out


def _make_readable_dirs(d: Path) -> None:
    """`d` and the parents this makes, enterable by everyone (an existing parent is left as it is)."""
    missing = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir(exist_ok=True)
        os.chmod(m, 0o755)


def shim_env(shim: Path) -> dict[str, str]:
    """What a level 3 QEMU's environment gets to create its userfaultfd."""
    return {"LD_PRELOAD": str(shim), SHIM_ENV: str(SHIM_FD)}


@dataclass(frozen=True)
class Support:
    """Whether this host tracks written pages exactly (else level 3 compares pages)."""

    shim: Path | None
    why: str   # the verdict, for `vm show`, metrics and the log

    @property
    def exact(self) -> bool:
        return self.shim is not None


COMPARE = Support(None, "page compare")


def probe(run_as: RunAs | None) -> Support:
    """At agent start: build the shim, then do what a level 3 QEMU will do, on a throwaway
    process (`sleep`) running as QEMU's user: create the userfaultfd in it, take a copy,
    register and write-protect part of its memory, scan it. Any refusal -> compare."""
    try:
        shim = build_shim()
    except (TrackerError, OSError) as e:
        return Support(None, f"page compare: {e}")
    kwargs = run_as.popen() if run_as is not None else {}
    env = {**os.environ, **shim_env(shim)}
    try:
        proc = subprocess.Popen(["sleep", "30"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, **kwargs)
    except OSError as e:
        return Support(None, f"page compare: cannot run the probe ({e})")
    pidfd = os.pidfd_open(proc.pid)
    try:
        for _ in range(500):  # the constructor runs before sleep's main
            if _has_shim_fd(proc.pid) or proc.poll() is not None:
                break
            time.sleep(0.002)
        _probe_stack(proc.pid, pidfd)
        return Support(shim, "exact: userfaultfd write-protect (async) + PAGEMAP_SCAN")
    except TrackerError as e:
        proc.kill()
        said = proc.communicate()[1].decode(errors="replace").strip()[-300:]
        return Support(None, f"page compare: this host cannot track written pages ({e}{'; ' + said if said else ''})")
    finally:
        os.close(pidfd)
        proc.kill()
        proc.communicate()


def _has_shim_fd(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{SHIM_FD}") == UFFD_LINK
    except OSError:
        return False


def _probe_stack(pid: int, pidfd: int) -> None:
    """What a session does to a QEMU's RAM, done to the probe process's stack."""
    def stack() -> tuple[int, int, int]:
        with open(f"/proc/{pid}/maps") as maps:
            line = next((ln for ln in maps if ln.rstrip().endswith("[stack]")), None)
        if line is None:
            raise TrackerError(0, "no stack mapping in the probe process")
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        return start, end, 0
    tracker = WriteTracker._attach(pid, pidfd, stack, "the shim made no userfaultfd in the probe process")
    try:
        tracker.scan()
    finally:
        tracker.close()


if __name__ == "__main__":
    import sys

    user = sys.argv[1] if len(sys.argv) > 1 else "root"
    print(probe(RunAs.lookup(user)).why)
