"""What an operator's disk image refers to besides itself (read from its header).

A qcow2 image may name other files: a backing file (an overlay's base) or an external
data file. QEMU, and `qemu-img convert` when a level 2 VM imports the image, would open
them wherever they are: outside the storage roots the agent checks (agent/paths.py), not
present on another host, or any file root can read. ftvm opens single-file images only
and refuses the others with the command that flattens them.
"""

from __future__ import annotations

import struct

QCOW2_MAGIC = b"QFI\xfb"
EXT_DATA_FILE = 0x44415441   # qcow2 header extension: external data file name
EXT_END = 0
MAX_HEADER = 64 * 1024       # header extensions are read this far at most (a crafted image is bounded)


def qcow2_references(header: bytes) -> list[str]:
    """Names of the other files a qcow2 header refers to ("backing file X", "data file Y");
    [] for a single-file image or for data that is not qcow2."""
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        return []
    version, backing_offset, backing_size = struct.unpack(">IQI", header[4:20])
    found = []
    if backing_offset:
        name = header[backing_offset:backing_offset + min(backing_size, 1023)]
        found.append(f"backing file {name.decode(errors='replace') or '(unreadable name)'}")
    if version >= 3 and len(header) >= 104:
        (header_length,) = struct.unpack(">I", header[100:104])
        pos = header_length
        while pos + 8 <= len(header):
            ext_type, ext_len = struct.unpack(">II", header[pos:pos + 8])
            if ext_type == EXT_END:
                break
            if ext_type == EXT_DATA_FILE:
                found.append(f"data file {header[pos + 8:pos + 8 + ext_len].decode(errors='replace')}")
            pos += 8 + (ext_len + 7) // 8 * 8
    return found


def image_problem(path: str, fmt: str) -> str | None:
    """Why ftvm will not open the image at `path` as format `fmt` (None: it may). Images
    that cannot be read are left to the caller's own checks."""
    if fmt != "qcow2":
        return None  # a raw image is read as bytes, whatever they hold
    try:
        with open(path, "rb") as f:
            header = f.read(MAX_HEADER)
    except OSError:
        return None
    refs = qcow2_references(header)
    if not refs:
        return None
    return (f"disk image {path} is a qcow2 image with a {' and a '.join(refs)}: ftvm opens single-file images "
            f"only; flatten it first (qemu-img convert -O qcow2 {path} FLAT.qcow2) and give that file")
