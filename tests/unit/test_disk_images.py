"""qcow2 images that refer to other files are refused, at definition and where they are
opened (qemu/images.py, agent/paths.py); real images made by qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ftvm.agent.paths import PathRefused, image_under, resolved_spec
from ftvm.core.model import DiskSpec, Level, VmSpec
from ftvm.qemu.images import image_problem, qcow2_references


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", *args], check=True, capture_output=True)


def test_overlays_and_external_data_files_are_refused_with_the_way_out(tmp_path: Path) -> None:
    base, flat = tmp_path / "base.raw", tmp_path / "flat.qcow2"
    qemu_img("-f", "raw", str(base), "1M")
    qemu_img("-f", "qcow2", str(flat), "1M")
    overlay, external = tmp_path / "overlay.qcow2", tmp_path / "ext.qcow2"
    qemu_img("-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    qemu_img("-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(external), "1M")
    assert image_problem(str(flat), "qcow2") is None
    assert image_problem(str(base), "raw") is None
    problem = image_problem(str(overlay), "qcow2") or ""
    assert f"backing file {base}" in problem and "qemu-img convert -O qcow2" in problem
    assert f"data file {tmp_path / 'data.raw'}" in (image_problem(str(external), "qcow2") or "")
    # a raw image is bytes, whatever they hold: the overlay read as raw refers to nothing
    assert image_problem(str(overlay), "raw") is None
    assert image_problem(str(tmp_path / "missing.qcow2"), "qcow2") is None  # left to "does not exist"

    roots = (str(tmp_path),)
    spec = VmSpec("web", Level.RESTART, 256, 1, (DiskSpec(str(overlay), "qcow2"),), ())
    with pytest.raises(PathRefused, match="backing file"):
        resolved_spec(spec, roots, ())
    assert resolved_spec(VmSpec("web", Level.RESTART, 256, 1, (DiskSpec(str(flat), "qcow2"),), ()), roots, ())
    with pytest.raises(PathRefused, match="backing file"):
        image_under(str(overlay), "qcow2", roots)
    with pytest.raises(PathRefused, match="outside this host's storage roots"):
        image_under("/etc/shadow", "raw", roots)  # a level 2 import reads as root: only from the roots
    assert image_under(str(flat), "qcow2", roots) == str(flat)


def test_crafted_headers_are_read_within_bounds() -> None:
    header = bytearray(b"QFI\xfb" + bytes(200))
    header[4:8] = (3).to_bytes(4, "big")
    header[8:16] = (10_000_000).to_bytes(8, "big")  # a backing name far beyond what was read
    header[16:20] = (0xFFFFFFFF).to_bytes(4, "big")
    header[100:104] = (196).to_bytes(4, "big")       # extensions start past the end: none read
    assert qcow2_references(bytes(header)) == ["backing file (unreadable name)"]
    assert qcow2_references(b"QFI\xfb") == [] and qcow2_references(b"\0" * 512) == []


def test_a_boot_disk_has_syslinux_the_kernel_and_the_ledger_partition(tmp_path: Path) -> None:
    import struct

    from ftvm.guest.bootdisk import BOOT_START, make_boot_disk
    from ftvm.guest.build import GuestImage
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.gz"
    kernel.write_bytes(b"K" * 100_000)
    initrd.write_bytes(b"I" * 50_000)
    disk = make_boot_disk(tmp_path / "boot.img", GuestImage(kernel, initrd, "console=ttyS0"), "10.0.0.7/24",
                          size_mib=80)
    raw = disk.path.read_bytes()
    assert len(raw) == 80 << 20 and raw[510:512] == b"\x55\xaa"
    parts = [struct.unpack("<B3sB3sII", raw[446 + 16 * i:462 + 16 * i]) for i in range(2)]
    assert parts[0][0] == 0x80 and parts[0][2] == 0x06 and parts[0][4] == BOOT_START  # bootable FAT16
    assert parts[1][2] == 0x83 and parts[1][4] * 512 == disk.ledger_offset
    assert parts[1][4] + parts[1][5] == 80 * 2048  # to the end of the disk
    listing = subprocess.run(["mdir", "-a", "-b", "-i", f"{disk.path}@@{BOOT_START * 512}", "::/"],
                             capture_output=True, text=True, check=True).stdout
    for name in ("LDLINUX.SYS", "LDLINUX.C32", "VMLINUZ", "INITRD.GZ", "SYSLINUX.CFG"):
        assert name in listing.upper(), listing
    cfg = subprocess.run(["mtype", "-i", f"{disk.path}@@{BOOT_START * 512}", "::/syslinux.cfg"],
                         capture_output=True, text=True, check=True).stdout
    assert "APPEND console=ttyS0 ftvm.ledger=/dev/vda2 ftvm.ip=10.0.0.7/24" in cfg
    with pytest.raises(FileExistsError):
        make_boot_disk(disk.path, GuestImage(kernel, initrd, ""), None)
