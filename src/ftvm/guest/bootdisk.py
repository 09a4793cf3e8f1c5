"""A demo guest that boots from its own disk, like a real server: BIOS -> MBR -> syslinux
-> kernel, no `--kernel` given to QEMU. Built from Debian packages (syslinux, mtools,
dosfstools) without mounting anything or needing a loop device:

    sector 0          syslinux's MBR boot code + a DOS partition table
    partition 1       FAT16, bootable: ldlinux.sys/.c32 (syslinux), vmlinuz, initrd, syslinux.cfg
                      (the kernel command line: console, ftvm.ip=, ftvm.ledger=/dev/vda2)
    partition 2       the ledger's records (raw; `ledger_offset` from the image's start)

The VM's address is written into syslinux.cfg: a disk is made per VM.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .build import GuestBuildError, GuestImage

MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
SECTOR = 512
BOOT_START = 2048            # sectors: partition 1 at 1 MiB, as partitioning tools align it
BOOT_SECTORS = 64 * 2048     # 64 MiB of FAT16 (the cloud kernel and the initrd take ~12 MiB)
MIN_SIZE_MIB = (BOOT_START + BOOT_SECTORS) // 2048 + 2  # the boot partition and a ledger of 1 MiB or more
TOOLS = {"mkfs.vfat": "dosfstools", "syslinux": "syslinux", "mcopy": "mtools"}


@dataclass(frozen=True)
class BootDisk:
    path: Path
    ledger_offset: int   # bytes: where partition 2 (the ledger) starts


def _partition_entry(bootable: bool, ptype: int, start: int, sectors: int) -> bytes:
    chs_max = b"\xfe\xff\xff"  # CHS fields past 8 GiB: LBA is what counts
    return struct.pack("<B3sB3sII", 0x80 if bootable else 0, chs_max, ptype, chs_max, start, sectors)


def partition_table(total_sectors: int) -> tuple[bytes, int]:
    """(the 66 bytes from offset 446: two partitions and the boot signature, partition 2's
    first sector). Partition 2 starts on a 1 MiB boundary after partition 1."""
    ledger_start = BOOT_START + BOOT_SECTORS
    if total_sectors < MIN_SIZE_MIB * 2048:
        raise GuestBuildError(f"a boot disk needs at least {MIN_SIZE_MIB} MiB")
    table = (_partition_entry(True, 0x06, BOOT_START, BOOT_SECTORS)
             + _partition_entry(False, 0x83, ledger_start, total_sectors - ledger_start)
             + bytes(32) + b"\x55\xaa")
    return table, ledger_start


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def make_boot_disk(path: Path, image: GuestImage, ip: str | None, size_mib: int = 128) -> BootDisk:
    """A bootable demo guest disk at `path` (refuses to overwrite)."""
    missing = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing or not MBR_CODE.exists():
        raise GuestBuildError("a boot disk needs " + ", ".join(missing or [f"{MBR_CODE} (syslinux-common)"])
                              + ": install syslinux syslinux-common mtools dosfstools (./setup.sh does)")
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    total = size_mib * 2048
    table, ledger_start = partition_table(total)
    append = f"{image.append} ftvm.ledger=/dev/vda2" + (f" ftvm.ip={ip}" if ip else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.truncate(total * SECTOR)
            os.posix_fallocate(f.fileno(), 0, total * SECTOR)
            mbr = bytearray(SECTOR)
            mbr[:440] = MBR_CODE.read_bytes()[:440].ljust(440, b"\0")
            mbr[440:444] = os.urandom(4)  # disk signature
            mbr[446:512] = table
            f.write(mbr)
        offset = BOOT_START * SECTOR
        _run(["mkfs.vfat", "-F", "16", "-n", "FTVMBOOT", f"--offset={BOOT_START}", str(partial),
              str(BOOT_SECTORS // 2)])
        _run(["syslinux", f"--offset={offset}", "--install", str(partial)])
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "syslinux.cfg"
            cfg.write_text("SERIAL 0 115200\nDEFAULT ftvm\nPROMPT 0\nTIMEOUT 0\n"
                           f"LABEL ftvm\n  LINUX /vmlinuz\n  INITRD /initrd.gz\n  APPEND {append}\n")
            target = f"{partial}@@{offset}"
            for src, name in ((image.kernel, "vmlinuz"), (image.initrd, "initrd.gz"), (cfg, "syslinux.cfg")):
                _run(["mcopy", "-o", "-i", target, str(src), f"::/{name}"])
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
    return BootDisk(path, ledger_start * SECTOR)
