"""Build the demo guest: Debian cloud kernel + busybox initramfs + ledger service.

The result is cached under a directory named by a hash of every input (kernel
package version, busybox binary, ledger source, init script), so it is rebuilt
only when one of them changes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GUEST_SRC = Path(__file__).parent
BUSYBOX = Path("/bin/busybox")
# Load order follows each module's depends= line (the package has no modules.dep).
# evdev and button: the ACPI power button, so `vm stop` shuts the guest down cleanly.
# pvpanic, pvpanic-mmio: the kernel tells QEMU when it panics (ftvm restarts the guest).
GUEST_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_blk", "evdev", "button",
    "pvpanic", "pvpanic-mmio",
]


class GuestBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    append: str  # kernel command line, without per-VM parts

    def to_json(self) -> dict[str, str]:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "append": self.append}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTVM_CACHE", "/var/cache/ftvm")) / "guest"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the current Debian cloud kernel."""
    out = _run(["apt-cache", "depends", "linux-image-cloud-amd64"])
    pkgs = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.strip().startswith("Depends:")]
    pkgs = [p for p in pkgs if p.startswith("linux-image-") and p.endswith("-cloud-amd64")]
    if not pkgs:
        raise GuestBuildError("apt-cache knows no linux-image-*-cloud-amd64 (run apt-get update)")
    pkg = pkgs[0]
    policy = _run(["apt-cache", "policy", pkg])
    version = next((ln.split(":", 1)[1].strip() for ln in policy.splitlines()
                    if ln.strip().startswith("Candidate:")), "")
    if not version or version == "(none)":
        raise GuestBuildError(f"no installable version of {pkg}")
    return pkg, version


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_digest(kernel_pkg: str, kernel_version: str) -> str:
    h = hashlib.sha256()
    for part in (kernel_pkg, kernel_version, _sha(BUSYBOX), " ".join(GUEST_MODULES),
                 _sha(GUEST_SRC / "ledger.c"), _sha(GUEST_SRC / "init.sh")):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _cpio_newc(root: Path) -> bytes:
    """Pack a directory as a newc cpio archive (what the kernel unpacks)."""
    proc = subprocess.run(["sh", "-c", "find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0"],
                          cwd=root, capture_output=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"cpio failed: {proc.stderr.decode()[-500:]}")
    return proc.stdout


def build_guest(cache_dir: Path | None = None, log=print) -> GuestImage:
    """Return the cached demo guest, building it first if any input changed."""
    if not BUSYBOX.exists():
        raise GuestBuildError("/bin/busybox missing: install busybox-static")
    cache_dir = cache_dir or default_cache_dir()
    pkg, version = resolve_kernel_package()
    out = cache_dir / input_digest(pkg, version)
    manifest = out / "manifest.json"
    # no panic=: a panicked kernel waits, as most do, until ftvm resets it (pvpanic).
    # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer test can miss
    # its ticks and panic at boot ("IO-APIC + timer doesn't work!"), before pvpanic is up,
    # so nothing resets it (seen by the fault campaign; virtual machines skip the test)
    image = GuestImage(out / "vmlinuz", out / "initramfs.cpio.gz", "console=ttyS0 quiet no_timer_check")
    if manifest.exists():
        with contextlib.suppress(OSError):  # (a read-only cache is still usable)
            os.utime(manifest)  # in use: kept by `prune_unused` for another KEEP_UNUSED_DAYS
        return image
    log(f"building demo guest ({pkg} {version}) in {out}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp_s:
        tmp = Path(tmp_s)
        _run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp)
        deb = next(tmp.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "kernel")])
        vmlinuz = next((tmp / "kernel" / "boot").glob("vmlinuz-*"))
        root = tmp / "root"
        for d in ("bin", "dev", "proc", "sys", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for name in GUEST_MODULES:
            found = list((tmp / "kernel" / "lib" / "modules").rglob(f"{name}.ko"))
            if not found:
                raise GuestBuildError(f"kernel package {pkg} has no module {name}.ko")
            shutil.copy2(found[0], root / "lib" / "modules" / f"{name}.ko")
        _run(["gcc", "-static", "-O2", "-Wall", "-o", str(root / "bin" / "ledger"),
              str(GUEST_SRC / "ledger.c")])
        shutil.copy2(GUEST_SRC / "init.sh", root / "init")
        os.chmod(root / "init", 0o755)
        staged = tmp / "out"
        staged.mkdir()
        shutil.copy2(vmlinuz, staged / "vmlinuz")
        (staged / "initramfs.cpio.gz").write_bytes(gzip.compress(_cpio_newc(root), 6))
        (staged / "manifest.json").write_text(json.dumps(
            {"kernel_package": pkg, "kernel_version": version, "modules": GUEST_MODULES}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # atomic: a half-built guest is never seen as cached
    prune_unused(cache_dir, keep=out)
    return image


KEEP_UNUSED_DAYS = 7.0


def prune_unused(cache_dir: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove cached builds nobody used for KEEP_UNUSED_DAYS (each use touches its manifest).
    Not every other build: another checkout on this machine (other guest sources) may be
    booting its own right now."""
    now = time.time() if now is None else now
    removed = []
    for old in cache_dir.iterdir():
        manifest = old / "manifest.json"
        if old == keep or not old.is_dir() or not manifest.exists():
            continue
        if now - manifest.stat().st_mtime > KEEP_UNUSED_DAYS * 86400:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def make_ledger_disk(path: Path, size_mib: int = 64, sparse: bool = False) -> None:
    """Create a zeroed raw disk for the ledger (refuses to overwrite); allocated, as ftvm's
    own copies are, unless `sparse` (a disk of tens of GiB in the lab)."""
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
        if not sparse:
            os.posix_fallocate(f.fileno(), 0, size_mib * 1024 * 1024)
