"""Checks on operator input, before anything is written. Each returns the first
problem as one line naming it, or None. Pure: file existence is passed in."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import REFUSED, Problem
from .model import MAC_RE, Level, PoolSnapshot, VmSpec, check_nic_ip, spec_problem, valid_name


def check_mac(mac: str) -> str | None:
    if not MAC_RE.fullmatch(mac):
        return f"malformed MAC address {mac!r}: expected six lowercase hex pairs like 52:54:00:12:34:56"
    if int(mac[:2], 16) & 1:
        return f"MAC address {mac} is a multicast address"
    return None


def _roots(snapshot: PoolSnapshot) -> str:
    roots = sorted({r for h in snapshot.hosts.values() for r in h.shared_storage + h.image_roots})
    return ", ".join(roots) or "none"


def check_new_vm(spec: VmSpec, snapshot: PoolSnapshot, file_exists: Callable[[str], bool],
                 image_problem: Callable[[str, str], str | None] = lambda path, fmt: None) -> str | None:
    """`image_problem(path, format)`: why an existing image will not be opened (a qcow2 that
    refers to other files: qemu/images.py)."""
    if not valid_name(spec.name):
        return f"invalid VM name {spec.name!r}: lowercase letters, digits and '-', starting with a letter"
    if spec.name in snapshot.vms:
        return Problem(f"VM {spec.name} already exists", REFUSED)
    if spec.memory_mib < 16:
        return f"memory {spec.memory_mib} MiB is too small (at least 16)"
    if spec.vcpus < 1:
        return "a VM needs at least one vCPU"
    if not snapshot.hosts:
        return "no live host in the pool: cannot check the VM fits anywhere"
    biggest = max(h.memory_mib for h in snapshot.hosts.values())
    if spec.memory_mib > biggest:
        return f"memory {spec.memory_mib} MiB is larger than any host (largest: {biggest} MiB)"
    most_cpus = max(h.vcpus for h in snapshot.hosts.values())
    if spec.vcpus > most_cpus:
        return f"{spec.vcpus} vCPUs is more than any host has ({most_cpus})"
    if not spec.disks and not spec.boot.kernel:
        return "a VM needs a disk or a kernel to boot"
    if spec.sla_percent is not None and not 0 < spec.sla_percent <= 100:
        return f"SLA target {spec.sla_percent}% must be above 0 and at most 100"
    if spec.level is Level.SYSTEM:
        if not 20 <= spec.checkpoint_ms <= 10_000:
            return f"checkpoint interval {spec.checkpoint_ms} ms must be between 20 and 10000"
        if not spec.nics:
            return "level 3 commits output through the VM's NIC: give at least one NIC"
        if any(disk.size % 4096 for disk in spec.disks):
            return ("level 3 disk sizes must be a multiple of 4096 bytes (checkpoints copy whole pages; "
                    "an image to import can be grown with qemu-img resize)")
    if spec.level.has_copies:
        if not spec.disks:
            return f"level {int(spec.level)} keeps a copy of the disks on a partner: give at least one " \
                   "--disk-size (or --disk IMAGE to import, level 2)"
        for disk in spec.disks:
            if disk.path and not file_exists(disk.path):
                return f"disk image {disk.path} does not exist"
            refused = image_problem(disk.path, disk.format) if disk.path else None
            if refused:
                return refused
            if disk.size < 1 << 20 or disk.size % 512:
                return f"disk size {disk.size} must be at least 1 MiB and a multiple of 512 bytes"
        if len(snapshot.hosts) < 2:
            return f"level {int(spec.level)} needs a partner host: fewer than 2 hosts are up"
    for disk in (spec.disks if not spec.level.has_copies else ()):
        if not disk.path.startswith("/"):
            return f"disk path {disk.path!r} must be absolute"
        if not file_exists(disk.path):
            return f"disk image {disk.path} does not exist"
        if disk.format not in ("raw", "qcow2"):
            return f"disk format {disk.format!r} is not raw or qcow2"
        refused = image_problem(disk.path, disk.format)
        if refused:
            return refused
    for label, path in (("kernel", spec.boot.kernel), ("initrd", spec.boot.initrd)):
        if path is not None and not file_exists(path):
            return f"{label} {path} does not exist"
        if path is not None and not any(h.may_open(path) for h in snapshot.hosts.values()):
            return f"{label} {path} is under no host's shared storage or image roots ({_roots(snapshot)})"
    if spec.level is Level.UNPROTECTED:
        for disk in spec.disks:
            if not any(h.may_open(disk.path) for h in snapshot.hosts.values()):
                return f"disk {disk.path} is under no host's shared storage or image roots ({_roots(snapshot)})"
    if spec.boot.initrd and not spec.boot.kernel:
        return "an initrd needs a kernel"
    if spec.level is Level.RESTART:
        for disk in spec.disks:
            if not any(h.can_reach(VmSpec(spec.name, spec.level, 1, 1, (disk,), ()))
                       for h in snapshot.hosts.values()):
                roots = sorted({r for h in snapshot.hosts.values() for r in h.shared_storage})
                return (f"level 1 restarts the VM on another host, so its disks must be on shared "
                        f"storage; {disk.path} is not under {', '.join(roots) or 'any shared storage'}")
    seen_macs = {nic.mac for v in snapshot.vms.values() for nic in v.spec.nics}
    for nic in spec.nics:
        problem = check_mac(nic.mac)
        if problem:
            return problem
        if nic.mac in seen_macs:
            return f"MAC address {nic.mac} is already used by another VM"
    for nic in spec.nics:
        if nic.ip is not None and check_nic_ip(nic.ip):
            return check_nic_ip(nic.ip)
    problem = spec_problem(spec)  # what any agent reading it back would refuse
    if problem:
        return problem
    if spec.preferred_host is not None and spec.preferred_host not in snapshot.hosts:
        return f"host {spec.preferred_host} is not a live host of the pool"
    return None
