"""Operator-given paths (level 0/1 disks, kernel, initrd), checked on the host that opens
them: resolved with realpath (symlinks and `..`) and accepted only under this host's
shared storage or image roots (host.toml). The spec's path is only what was asked; the
resolved one is what QEMU opens."""

from __future__ import annotations

import os
from dataclasses import replace

from ..core.model import Level, VmSpec
from ..qemu.images import image_problem


class PathRefused(RuntimeError):
    pass


def under(path: str, roots: tuple[str, ...]) -> str:
    """`path` resolved, if it lies under one of `roots` (also resolved); else PathRefused."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            return real
    shown = real if real == path else f"{path} (resolves to {real})"
    raise PathRefused(f"{shown} is outside this host's storage roots ({', '.join(roots) or 'none configured'})")


def resolved_spec(spec: VmSpec, shared: tuple[str, ...], image_roots: tuple[str, ...]) -> VmSpec:
    """`spec` with its operator-given paths resolved and checked. Level 1 disks must be on
    shared storage (another host restarts the VM from them); level 0 disks and boot files
    may also be under the image roots. Levels 2 and 3 keep their disks in this host's local
    storage under names ftvm makes, so only their boot files are checked (an image a level 2
    or 3 disk imports: `image_under`, when it is imported). A qcow2 image that refers to
    other files is refused (qemu/images.py)."""
    anywhere = shared + image_roots
    disks = spec.disks
    if not spec.level.has_copies:
        roots = shared if spec.level is Level.RESTART else anywhere
        disks = tuple(replace(d, path=image_under(d.path, d.format, roots)) for d in spec.disks)
    boot = spec.boot
    boot = replace(boot, kernel=under(boot.kernel, anywhere) if boot.kernel else None,
                   initrd=under(boot.initrd, anywhere) if boot.initrd else None)
    return replace(spec, disks=disks, boot=boot)


def image_under(path: str, fmt: str, roots: tuple[str, ...]) -> str:
    """A disk image QEMU opens, or a brand-new level 2/3 copy is imported from (read by root):
    resolved, under `roots`, and a single file; else PathRefused."""
    real = under(path, roots)
    problem = image_problem(real, fmt)
    if problem:
        raise PathRefused(problem)
    return real
