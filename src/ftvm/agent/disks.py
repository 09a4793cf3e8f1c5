"""This host's copies of VM disks (levels 2 and 3): where they are, which VM definition
they belong to (agent/copydir.py), making empty or imported ones for a brand-new VM, and
never replacing a current copy that is missing (that is an error, not a fresh start)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.model import DiskSpec, VmSpec
from ..core.replication import Copies, brand_new_on, may_start_on
from ..l3.standby import ReplicaPaths
from ..qemu.blockgraph import DiskGraph, LocalImage, local_only_start
from ..qemu.storage_daemon import StorageDaemonError, ensure_image, import_image, writable_copy
from .config import AgentConfig
from .copydir import claim_copy_dir, copy_image
from .journal import Journal
from .l3 import replica_paths
from .paths import PathRefused, image_under


@dataclass(frozen=True)
class IncomingDisks:
    """A level 2 migration target's disks: this host's copies, opened local-only."""

    images: list[LocalImage]
    graphs: list[DiskGraph]
    blockdevs: list[list[dict[str, Any]]]


class HostDisks:
    def __init__(self, cfg: AgentConfig, journal: Journal) -> None:
        self.cfg, self.journal = cfg, journal
        self._claimed: set[tuple[str, str]] = set()  # (VM, definition) copy dirs checked

    def copy_dir(self, spec: VmSpec) -> Path:
        """This host's directory of the VM's copies, made sure to be this definition's: the
        images of an earlier VM of the same name are set aside first (agent/copydir.py)."""
        if self.cfg.local_storage is None:
            raise StorageDaemonError("this host has no local_storage configured for level 2 and 3 copies")
        d = self.cfg.local_storage / spec.name
        if (spec.name, spec.definition) not in self._claimed:
            moved = claim_copy_dir(d, spec.definition)
            if moved is not None:
                self.journal.event(spec.name, "warning", f"{d} held the images of an earlier VM named "
                                                         f"{spec.name}: set aside as {moved} (not deleted)")
            self._claimed.add((spec.name, spec.definition))
        return d

    def image(self, spec: VmSpec, index: int) -> LocalImage:
        """This host's level 2 copy of disk `index`."""
        return copy_image(self.copy_dir(spec).parent, spec.name, index, self.cfg.local_format)

    def l3_files(self, spec: VmSpec) -> ReplicaPaths:
        """This host's level 3 files of the VM (RAM, disks, committed checkpoint)."""
        return replica_paths(spec, self.cfg.guest_ram_dir, self.copy_dir(spec).parent)

    def writable(self, image: LocalImage) -> LocalImage:
        return writable_copy(image, self.cfg.write_through_copies)

    def prepare(self, spec: VmSpec, copies: Copies | None) -> list[LocalImage]:
        """This host's copy of each disk, to start the VM on. An empty (or imported) one is
        made only for a brand-new VM; a current copy that is missing is an error."""
        brand_new = brand_new_on(copies, self.cfg.name)
        images = []
        for i, disk in enumerate(spec.disks):
            image = self.image(spec, i)
            if not os.path.exists(image.path):
                if not brand_new:
                    raise StorageDaemonError(f"this host's copy {image.path} is missing")
                if disk.path:
                    self.import_into(disk, image)
                else:
                    ensure_image(image, disk.size)
            images.append(self.writable(image))
        return images

    def import_into(self, disk: DiskSpec, image: LocalImage) -> None:
        """A brand-new VM's first copy from the image its disk names (read as root: only from
        this host's storage roots, and only a single-file image)."""
        try:
            source = image_under(disk.path, disk.format, self.cfg.shared_storage + self.cfg.image_roots)
        except PathRefused as e:
            raise StorageDaemonError(f"cannot import the disk image: {e}") from None
        import_image(source, disk.format, image)

    def incoming(self, spec: VmSpec, copies: Copies | None) -> IncomingDisks:
        """Level 2 target: the QEMU receiving the VM opens this host's copy, which must be
        current (the source checks it again in the handover)."""
        ok, why = may_start_on(copies, self.cfg.name)
        if not ok:
            raise StorageDaemonError(f"cannot receive the VM on its disks: {why}")
        images = [self.image(spec, i) for i in range(len(spec.disks))]
        graphs, blockdevs = [], []
        for i, image in enumerate(images):
            if not os.path.exists(image.path):
                raise StorageDaemonError(f"this host's copy {image.path} is missing")
            image = images[i] = self.writable(image)
            g, nodes = local_only_start(i, image)
            graphs.append(g)
            blockdevs.append(nodes)
        return IncomingDisks(images, graphs, blockdevs)
