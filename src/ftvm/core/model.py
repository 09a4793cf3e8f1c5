"""The pool as the decision core sees it: immutable values, no I/O.

A `PoolSnapshot` is read from the store at one etcd revision; the agent adds
a `LocalView` of the QEMU processes it runs itself. Everything here converts
to and from plain JSON so that the store, the CLI and the tests share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, asdict
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .replication import Copies, CopyState

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class Level(int, Enum):
    UNPROTECTED = 0
    RESTART = 1
    COMPONENT = 2  # disks mirrored synchronously to a partner host
    SYSTEM = 3     # RAM, CPU and disks checkpointed continuously to a partner host (output commit)

    @property
    def has_copies(self) -> bool:
        """Each host keeps its own copy of the disks (levels 2 and 3): a host may run the
        VM only from a current copy (core/replication.py)."""
        return self in (Level.COMPONENT, Level.SYSTEM)


class Desired(str, Enum):
    RUNNING = "running"
    STOPPED = "stopped"


class RunState(str, Enum):
    """What an agent reports about a VM it owns."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"  # QEMU exited without being asked to
    INCOMING = "incoming"  # (not owned) QEMU waits for a live migration into this host


@dataclass(frozen=True)
class DiskSpec:
    """Levels 0/1: `path` is the image (shared storage for level 1). Level 2: each host
    keeps its own copy in its local storage, in its own format; `size` is in bytes."""

    path: str = ""
    format: str = "raw"
    size: int = 0


@dataclass(frozen=True)
class NicSpec:
    mac: str
    ip: str | None = None  # "addr/prefix" handed to the demo guest; informative otherwise


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot (kernel + initrd) or, with kernel None, boot from the first disk."""

    kernel: str | None = None
    initrd: str | None = None
    append: str = ""


@dataclass(frozen=True)
class VmSpec:
    name: str
    level: Level
    memory_mib: int
    vcpus: int
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]
    boot: BootSpec = BootSpec()
    desired: Desired = Desired.STOPPED
    preferred_host: str | None = None
    checkpoint_ms: int = 100  # level 3: longest time the guest runs between checkpoints
    checkpoint_on_output: bool = False  # level 3: also checkpoint as soon as the guest sends
    sla_percent: float | None = None  # availability target the reports compare with, e.g. 99.99
    failback: bool = False  # move back live to preferred_host whenever it can run the VM again

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = int(self.level)
        d["desired"] = self.desired.value
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> VmSpec:
        return VmSpec(
            name=d["name"],
            level=Level(d["level"]),
            memory_mib=int(d["memory_mib"]),
            vcpus=int(d["vcpus"]),
            disks=tuple(DiskSpec(**x) for x in d["disks"]),
            nics=tuple(NicSpec(**x) for x in d["nics"]),
            boot=BootSpec(**d.get("boot", {})),
            desired=Desired(d.get("desired", "stopped")),
            preferred_host=d.get("preferred_host"),
            checkpoint_ms=int(d.get("checkpoint_ms", 100)),
            checkpoint_on_output=bool(d.get("checkpoint_on_output", False)),
            sla_percent=float(d["sla_percent"]) if d.get("sla_percent") is not None else None,
            failback=bool(d.get("failback", False)),
        )


@dataclass(frozen=True)
class HostInfo:
    """A live host: its record exists only while its lease does."""

    name: str
    memory_mib: int
    vcpus: int
    shared_storage: tuple[str, ...] = ()
    lease_id: int = 0
    replication_addr: str = ""  # where this host serves its Level 2 copies (A-links)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shared_storage"] = list(self.shared_storage)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> HostInfo:
        return HostInfo(
            name=d["name"], memory_mib=int(d["memory_mib"]), vcpus=int(d["vcpus"]),
            shared_storage=tuple(d.get("shared_storage", ())), lease_id=int(d.get("lease_id", 0)),
            replication_addr=d.get("replication_addr", ""),
        )

    def can_reach(self, spec: VmSpec) -> bool:
        """Whether every disk of `spec` lies on storage this host shares."""
        return all(any(_under(disk.path, root) for root in self.shared_storage) for disk in spec.disks)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") + "/"
    return path.startswith(root)


@dataclass(frozen=True)
class Ownership:
    """Who may run a VM. `token` is the etcd create_revision of the owner key:
    a fencing token, checked in every transaction the owner makes."""

    host: str
    token: int


@dataclass(frozen=True)
class VmStatus:
    host: str
    state: RunState
    token: int
    since: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> VmStatus:
        return VmStatus(host=d["host"], state=RunState(d["state"]), token=int(d["token"]),
                        since=float(d["since"]), detail=d.get("detail", ""))


@dataclass(frozen=True)
class Export:
    """A partner's NBD export of its copy of a Level 2 VM's disks (lease-bound)."""

    host: str
    addr: str
    port: int
    fresh: bool = False  # the partner had no image and made an empty one


@dataclass(frozen=True)
class SyncProgress:
    """Resync of a partner's copy, published by the primary."""

    host: str
    done: int
    total: int
    rate: float  # bytes/s
    full: bool

    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


@dataclass(frozen=True)
class CheckpointFigures:
    """Level 3 engine figures, published by the primary every few seconds (lease-bound)."""

    partner: str
    state: str                # "protected" | "syncing" | "unprotected"
    reason: str = ""          # why not protected
    per_s: float = 0.0        # checkpoints per second
    pause_p50_ms: float = 0.0
    pause_p99_ms: float = 0.0
    ram_diff_p50_ms: float = 0.0       # the pause broken down (RAM and disk compares run beside
    disk_diff_p50_ms: float = 0.0      # the device-state save, so they overlap)
    device_state_p50_ms: float = 0.0
    running_fraction: float = 1.0      # share of the time the guest ran (not paused)
    dirty_pages_p50: float = 0.0
    disk_pages_p50: float = 0.0
    link_bytes_per_s: float = 0.0
    epoch: int = 0            # last checkpoint acknowledged by the partner
    sync_done: float = 0.0    # pre-copy progress while syncing (0..1)


@dataclass(frozen=True)
class Migration:
    """A live migration the owner was asked to make (lease: the owner's)."""

    to: str
    source: str
    token: int            # the source's fencing token when it was requested
    started: float
    phase: str = "requested"   # requested | transferring | handing over
    done: int = 0              # bytes of RAM sent so far / to send (progress)
    total: int = 0


@dataclass(frozen=True)
class LevelChange:
    """An online change of a running VM's protection level (lease: the owner's).
    `disk_paths`: lowering to level 1, the shared-storage images the disks move to."""

    level: int
    source: str           # the owner when it was asked
    token: int            # ... and its fencing token
    requested: float
    disk_paths: tuple[str, ...] = ()
    phase: str = "requested"   # requested | copying | switching
    done: int = 0              # bytes copied so far / to copy (progress)
    total: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["disk_paths"] = list(self.disk_paths)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> LevelChange:
        return LevelChange(**(d | {"disk_paths": tuple(d.get("disk_paths", ()))}))


@dataclass(frozen=True)
class Incoming:
    """The target of a migration is ready to receive it (lease: the target's)."""

    host: str
    addr: str
    port: int


@dataclass(frozen=True)
class VmView:
    spec: VmSpec
    owner: Ownership | None = None
    status: VmStatus | None = None
    home: str | None = None  # last host that ran it (not lease-bound)
    copies: "Copies | None" = None      # level 2: who holds a current copy
    exports: tuple[Export, ...] = ()    # level 2: partners serving their copy
    sync: SyncProgress | None = None    # level 2: resync in progress
    force_host: str | None = None       # operator accepted data loss to start here
    repair_host: str | None = None      # operator: this host's failed copy can be resynced
    checkpoints: CheckpointFigures | None = None  # level 3: the engine's figures
    migration: Migration | None = None  # live migration requested / under way
    incoming: Incoming | None = None    # its target is listening
    handover_host: str | None = None    # migrated: only this host may claim it now
    level_change: LevelChange | None = None  # online protection level change asked / under way

    def copy_state(self, host: str) -> "CopyState | None":
        """Level 2: the state of `host`'s copy, None if it holds none."""
        c = self.copies.state_of(host) if self.copies else None
        return c.state if c else None


@dataclass(frozen=True)
class PoolSnapshot:
    revision: int
    hosts: dict[str, HostInfo]
    vms: dict[str, VmView]
    # A-link health reported by each host: host -> peer -> interface -> up?
    links: dict[str, dict[str, dict[str, bool]]] = field(default_factory=dict)
    maintenance: frozenset[str] = frozenset()  # hosts an operator put in maintenance: nothing placed there

    def a_links_down(self, host: str, peer: str) -> tuple[list[str], list[str]]:
        """(down, up) A-link interfaces of `host` toward `peer`, as `host` reports them."""
        links = self.links.get(host, {}).get(peer, {})
        return sorted(i for i, up in links.items() if not up), sorted(i for i, up in links.items() if up)

    def replica_memory(self, host: str, exclude: str = "") -> int:
        """MiB of the level 3 RAM replicas `host` keeps for VMs running elsewhere (files in a
        tmpfs: real memory), `exclude`'s not counted."""
        return sum(v.spec.memory_mib for name, v in self.vms.items()
                   if name != exclude and v.spec.level is Level.SYSTEM and v.owner is not None
                   and v.owner.host != host and v.copies is not None and host in v.copies.copies)

    def used_memory(self, host: str, exclude: str = "") -> int:
        """MiB of the VMs `host` runs and of the level 3 RAM replicas it keeps; `exclude`'s
        replica is left out (when that VM moves or fails over there, its replica becomes its RAM)."""
        owned = sum(v.spec.memory_mib for v in self.vms.values() if v.owner and v.owner.host == host)
        return owned + self.replica_memory(host, exclude)

    def used_vcpus(self, host: str) -> int:
        return sum(v.spec.vcpus for v in self.vms.values() if v.owner and v.owner.host == host)

    def has_room(self, host: str, spec: VmSpec) -> bool:
        info = self.hosts[host]
        return (self.used_memory(host, exclude=spec.name) + spec.memory_mib <= info.memory_mib
                and self.used_vcpus(host) + spec.vcpus <= info.vcpus)


@dataclass(frozen=True)
class LocalVm:
    """A QEMU process this agent runs."""

    name: str
    state: RunState
    token: int
    exit_code: int | None = None


@dataclass(frozen=True)
class LocalView:
    host: str
    vms: dict[str, LocalVm] = field(default_factory=dict)
    exports: frozenset[str] = frozenset()  # level 2 VMs whose copy this host serves
    now: float = 0.0  # wall clock of this look (0: rules that need the time are off)
