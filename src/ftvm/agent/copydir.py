"""Which VM definition a host's copy directory belongs to.

A VM's copies live in `local_storage/<name>/`; `vm remove` keeps them. A new VM given
the same name later is another VM: it must never start on, import into, or resync from
the images of the old one. Each directory therefore holds a marker naming the definition
(`VmSpec.definition`, made when the VM is defined) it was made for. Another definition's
directory is set aside (renamed, never deleted: the operator decides) before a new one is
made.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..qemu.blockgraph import LocalImage

MARKER = ".ftvm-definition"


def copy_image(local_storage: Path, vm: str, index: int, fmt: str) -> LocalImage:
    """The one rule for where a host keeps its copy of a VM's disk `index`: levels 2 and 3
    (level 3 copies are always raw), the agent and the lab alike."""
    ext = "qcow2" if fmt == "qcow2" else "img"
    return LocalImage(str(local_storage / vm / f"disk{index}.{ext}"), fmt)


def claim_copy_dir(d: Path, definition: str) -> Path | None:
    """Make `d` the directory of `definition`. Returns where an earlier definition's
    directory was moved to, or None. A directory without a marker (made before markers
    existed) is adopted as it is; a VM defined before definitions existed ("") checks
    nothing."""
    if not definition:
        d.mkdir(parents=True, exist_ok=True)
        return None
    marker = d / MARKER
    moved: Path | None = None
    if d.is_dir() and marker.is_file():
        found = marker.read_text(errors="replace").strip()
        if found == definition:
            return None
        moved = d.with_name(f"{d.name}.removed-{time.strftime('%Y%m%dT%H%M%S')}-{found[:16]}")
        os.rename(d, moved)
    d.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(definition + "\n")
    os.replace(tmp, marker)
    return moved
