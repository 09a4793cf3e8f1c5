"""The pool as the decision core sees it: immutable values, no I/O.

A `PoolSnapshot` is read from the store at one etcd revision; the agent adds
a `LocalView` of the QEMU processes it runs itself. Everything here converts
to and from plain JSON so that the store, the CLI and the tests share it.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field, asdict, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from .health import settings_problem
from .records import RECORD_VERSION, RecordError, as_object, check_version, from_fields, value

if TYPE_CHECKING:
    from .guest_failures import GuestRecord
    from .replication import Copies, CopyState

# Always used with fullmatch(): `$` alone would let "web\n" through.
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
MAX_DISKS = 16
MAX_NICS = 8  # interface names must stay unique within 15 bytes (qemu/cmdline.tap_names)


def valid_name(name: object) -> bool:
    """A VM, host or pool name: it becomes part of paths, keys and interface names."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_nic_ip(ip: str) -> str | None:
    """A NIC's "addr/prefix" (handed to the guest on its kernel command line)."""
    try:
        iface = ipaddress.ip_interface(ip)
    except ValueError:
        return f"NIC address {ip!r} is not ADDRESS/PREFIX (e.g. 10.77.0.10/24)"
    if "/" not in ip:
        return f"NIC address {ip!r} needs a prefix length (e.g. {ip}/24)"
    if iface.ip.is_multicast or iface.ip.is_unspecified:
        return f"NIC address {ip} is not a host address"
    return None


def _normal_absolute(path: str) -> bool:
    return path.startswith("/") and posixpath.normpath(path) == path


DR_RPO_MIN_S = 3.0
DR_RPO_MAX_S = 86400.0


# A failback's switchover pauses the guest and cuts its last point from its QEMU: at level 3
# that point's backup job would make the checkpoints fail, and the engine would resume the
# guest to run on unprotected, after the last point was cut.
DR_SWITCH_LEVEL3 = "a failback's switchover is not taken at level 3 (its last point would break the checkpoints)"


def dr_interval_s(rpo_s: float) -> float:
    """How often a VM's owner closes a recovery point: a third of the RPO target (a point
    then waits at most an interval, and has two more to reach the DR site), at most a
    minute. The model (core/dr_model.py) says what a link does with that."""
    return max(1.0, min(60.0, rpo_s / 3))


def spec_problem(spec: VmSpec) -> str | None:
    """What makes a spec unusable by any agent, whoever wrote it (checked on every read
    from the store; `core/validate.py` adds the checks that need the pool)."""
    if not valid_name(spec.name):
        return f"invalid VM name {spec.name!r}"
    if not 1 <= spec.memory_mib <= 1 << 22 or not 1 <= spec.vcpus <= 1024:
        return f"memory {spec.memory_mib} MiB / {spec.vcpus} vCPUs out of range"
    if len(spec.disks) > MAX_DISKS:
        return f"{len(spec.disks)} disks: at most {MAX_DISKS}"
    if not re.fullmatch(r"[0-9a-f]{0,32}", spec.definition):
        return "definition: expected up to 32 hex digits"
    if len(spec.nics) > MAX_NICS:
        return f"{len(spec.nics)} NICs: at most {MAX_NICS}"
    for disk in spec.disks:
        if disk.path and not _normal_absolute(disk.path):
            return f"disk path {disk.path!r} is not a normalized absolute path"
        if disk.format not in ("raw", "qcow2"):
            return f"disk format {disk.format!r} is not raw or qcow2"
        if not 0 <= disk.size <= 1 << 50:
            return f"disk size {disk.size} out of range"
    for nic in spec.nics:
        if not MAC_RE.fullmatch(nic.mac):
            return f"malformed MAC address {nic.mac!r}"
        if nic.ip is not None and check_nic_ip(nic.ip):
            return check_nic_ip(nic.ip)
    for path in (spec.boot.kernel, spec.boot.initrd):
        if path is not None and not _normal_absolute(path):
            return f"boot file {path!r} is not a normalized absolute path"
    if not 1 <= spec.checkpoint_ms <= 3_600_000:
        return f"checkpoint interval {spec.checkpoint_ms} ms out of range"
    if spec.preferred_host is not None and not valid_name(spec.preferred_host):
        return f"invalid preferred host {spec.preferred_host!r}"
    if spec.site and not valid_name(spec.site):
        return f"invalid site {spec.site!r}"
    if spec.dr_target and not valid_name(spec.dr_target):
        return f"invalid DR target {spec.dr_target!r}"
    if spec.dr_target and not DR_RPO_MIN_S <= spec.dr_rpo_s <= DR_RPO_MAX_S:
        return f"DR RPO {spec.dr_rpo_s:g} s out of range ({DR_RPO_MIN_S:g} s to {DR_RPO_MAX_S / 3600:g} h)"
    if not 0 <= spec.guest_restarts <= 100 or not 60 <= spec.guest_window_s <= 30 * 86400:
        return (f"guest restarts {spec.guest_restarts} per {spec.guest_window_s:g} s out of range "
                "(0-100 per 1 min to 30 days)")
    return settings_problem(spec.health, spec.health_interval_s, spec.health_timeout_s, spec.health_failures,
                            spec.health_grace_s)


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
    # on a tap of its own, on no bridge: reaches nothing (a DR test failover's copy, which must
    # never talk to the production network)
    isolated: bool = False


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
    checkpoint_on_output: bool = True  # level 3: also checkpoint as soon as the guest sends (replies wait ms)
    sla_percent: float | None = None  # availability target the reports compare with, e.g. 99.99
    failback: bool = False  # move back live to preferred_host whenever it can run the VM again
    # how the next stop ends the guest: False asks it first (ACPI power button, the agent's
    # stop_grace), True powers it off at once (`vm stop --force`); cleared by a start
    stop_force: bool = False
    # made when the VM is defined (store.define_vm): a later VM of the same name is another
    # VM, whose copies never reuse this one's images (agent/copydir.py); "" for older specs
    definition: str = ""
    # a guest that fails on its own (kernel panic, watchdog, health probe) is restarted at most
    # this many times per window, then left stopped (core/guest_failures.py)
    guest_restarts: int = 3
    guest_window_s: float = 3600.0
    # an i6300esb watchdog device that resets the guest when its watchdog daemon stops
    # kicking it (a WATCHDOG guest failure); fixed at definition (a running VM's devices
    # must match its migration target's)
    watchdog: bool = False
    # a probe of the guest's service from the owner's host, "" for none (core/health.py):
    # `health_failures` in a row that fail are a guest failure; none count during
    # `health_grace_s` after the guest boots
    health: str = ""
    health_interval_s: float = 10.0
    health_timeout_s: float = 3.0
    health_failures: int = 3
    health_grace_s: float = 120.0
    # SplitSite: the site the VM runs at, and the one that keeps it when the sites lose
    # each other but both still reach the witness ("" none: the side running it keeps it;
    # core/sites.py)
    site: str = ""
    # asynchronous DR: the DR target (a pool, `ftvm dr target add`) its recovery points go
    # to, "" none; and the RPO the lag is held against (dr/, core/dr_points.py)
    dr_target: str = ""
    dr_rpo_s: float = 0.0
    # the DR site said it started this VM (`ftvm dr failover` there): this pool never starts
    # it again until a failback; the text says where and when ("" none)
    dr_failed_over: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = int(self.level)
        d["desired"] = self.desired.value
        d["v"] = RECORD_VERSION
        return d

    @staticmethod
    def from_json(d: object) -> VmSpec:
        """Raises RecordError on a spec no agent can use (types, version, spec_problem)."""
        obj = as_object(d, "spec")
        check_version(obj, "spec")
        nested: dict[str, Any] = {}
        for key, cls in (("disks", DiskSpec), ("nics", NicSpec)):
            items = obj.get(key, [])
            if not isinstance(items, (list, tuple)) or len(items) > 64:
                raise RecordError(f"spec.{key}: expected a list")
            nested[key] = tuple(from_fields(cls, x, f"spec.{key}[{i}]") for i, x in enumerate(items))
        nested["boot"] = from_fields(BootSpec, obj.get("boot", {}), "spec.boot")
        if isinstance(obj.get("level"), bool):
            raise RecordError("spec.level: expected an integer")
        spec = from_fields(VmSpec, obj, "spec", **nested)
        problem = spec_problem(spec)
        if problem:
            raise RecordError(f"spec: {problem}")
        return spec


@dataclass(frozen=True)
class HostInfo:
    """A live host: its record exists only while its lease does."""

    name: str
    memory_mib: int
    vcpus: int
    shared_storage: tuple[str, ...] = ()
    lease_id: int = 0
    replication_addr: str = ""  # where this host serves its Level 2 copies (A-links)
    image_roots: tuple[str, ...] = ()  # besides shared storage, where level 0 disks and boot files may be
    api_url: str = ""  # its agent's API ("https://addr:port"), "" if it serves none: consoles are forwarded there
    site: str = ""     # the site it stands in (host.toml `site`; "" none): partners go to another (core/sites.py)

    def may_open(self, path: str) -> bool:
        """Whether this host accepts a level 0 disk or a boot file at `path` (lexically; the
        agent checks the resolved path again: agent/paths.py)."""
        return any(_under(path, root) for root in self.shared_storage + self.image_roots)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shared_storage"] = list(self.shared_storage)
        d["image_roots"] = list(self.image_roots)
        d["v"] = RECORD_VERSION
        return d

    @staticmethod
    def from_json(d: object) -> HostInfo:
        obj = as_object(d, "host")
        check_version(obj, "host")
        info = from_fields(HostInfo, obj, "host")
        if not valid_name(info.name):
            raise RecordError(f"host: invalid name {info.name!r}")
        if info.site and not valid_name(info.site):
            raise RecordError(f"host: invalid site {info.site!r}")
        if not all(r.startswith("/") for r in info.shared_storage + info.image_roots):
            raise RecordError("host.shared_storage: paths must be absolute")
        if info.replication_addr:
            try:
                ipaddress.ip_address(info.replication_addr)
            except ValueError:
                raise RecordError(f"host.replication_addr: {info.replication_addr!r} is not an IP address") from None
        return info

    def can_reach(self, spec: VmSpec) -> bool:
        """Whether every disk of `spec` lies on storage this host shares."""
        return all(any(_under(disk.path, root) for root in self.shared_storage) for disk in spec.disks)


def _under(path: str, root: str) -> bool:
    """Lexically: `..` is resolved first. The agent checks the resolved path (symlinks)
    again before it opens anything (agent/paths.py)."""
    return posixpath.normpath(path).startswith(posixpath.normpath(root).rstrip("/") + "/")


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
    health: str = ""  # its health probe: "" none, "ok", "grace", "paused: why", "failing (k of N): what"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @staticmethod
    def from_json(d: object) -> VmStatus:
        return from_fields(VmStatus, d, "status")


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
class DrTarget:
    """Where a pool's DR points go: the receivers of another pool (`ftvm dr target add`),
    tried in order. Both pools hold the same DR pairing secret (host.toml dr_secret_file)."""

    name: str
    receivers: tuple[str, ...]   # "ADDR:PORT"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "receivers": list(self.receivers), "v": RECORD_VERSION}

    @staticmethod
    def from_json(d: object) -> DrTarget:
        obj = as_object(d, "DR target")
        check_version(obj, "DR target")
        name = value(str, obj.get("name"), "DR target.name")
        receivers = value(tuple[str, ...], obj.get("receivers"), "DR target.receivers")
        if not valid_name(name) or not 0 < len(receivers) <= 8 or not all(receiver_problem(r) is None
                                                                          for r in receivers):
            raise RecordError("DR target: a name and 1-8 receivers ADDR:PORT")
        return DrTarget(name, receivers)


def receiver_problem(text: str) -> str | None:
    addr, _, port = text.rpartition(":")
    try:
        ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        return f"receiver {text!r}: expected ADDR:PORT with an IP address"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"receiver {text!r}: port out of range"
    return None


@dataclass(frozen=True)
class DrPoint:
    number: int
    taken_at: float
    tested: bool = False
    data_bytes: int = 0   # disk content it holds (what choosing an older point loses)


@dataclass(frozen=True)
class DrContact:
    """What a DR receiver last heard of a source VM: a failover states from it what is lost
    after the point it starts from, and waits until the source was silent long enough."""

    heard_at: float = 0.0          # the source's last message (wall clock, this host's)
    confirm_s: float = 0.0         # the source pool's dr_confirm (core/timing.py)
    in_flight_bytes: int = 0       # data of a point still arriving then (lost with the source)
    in_flight_taken_at: float = 0.0


@dataclass(frozen=True)
class DrConfirmation:
    """The DR site said, at `at` (the writer's wall clock), that it has not taken the VM over
    (no lease: it outlives the host that wrote it). A VM with a DR target is started only
    within `dr_confirm` of one (core/decide.py)."""

    at: float
    target: str
    by: str


DR_FAILOVER_MARGIN_S = 10.0  # a failover waits the source's dr_confirm and this (clocks, its last tick)


@dataclass(frozen=True)
class DrFailover:
    """A DR failover asked at the DR site (`ftvm dr failover`): the host keeping the points
    starts point `point` as the VM itself; `loss` states what the source's writes after it
    were. No lease; removed by a failback."""

    pool: str
    vm: str
    point: int
    host: str
    asked_at: float
    loss: str
    # failback (`ftvm dr failback`): the VM's points go back to this DR target (its home
    # pool's receivers); `switch_at`: the switchover asked (its owner pauses it, ships a
    # last point, stops it); `switched`: that point was delivered and the VM stopped here
    failback_target: str = ""
    switch_at: float = 0.0
    switched: bool = False
    newest: bool = False   # no point was named: the newest the host has when it starts it
    lost_s: float = 0.0    # seconds of writes `loss` says are lost, at least
    level: int = 0         # the level it runs at here (started at 0, then raised online)
    started: bool = False  # the VM is defined here: `point` and `loss` are what it started from


@dataclass(frozen=True)
class DrReplica:
    """A VM of another pool whose recovery points a host of this pool keeps (lease-bound,
    the receiving host's): what `ftvm dr points` lists and a DR failover starts from."""

    pool: str                   # the VM's own pool
    vm: str
    host: str                   # the host of this pool keeping the points
    points: tuple[DrPoint, ...]  # oldest first
    sizes: tuple[int, ...]      # bytes per disk
    updated: float = 0.0
    contact: DrContact = DrContact()
    failed_over: bool = False   # started here: it takes no more points

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "vm": self.vm, "host": self.host, "sizes": list(self.sizes),
                "points": [asdict(p) for p in self.points], "updated": self.updated,
                "contact": asdict(self.contact), "failed_over": self.failed_over, "v": RECORD_VERSION}

    @staticmethod
    def from_json(d: object) -> DrReplica:
        obj = as_object(d, "DR replica")
        check_version(obj, "DR replica")
        points = obj.get("points")
        if not isinstance(points, list) or len(points) > 10_000:
            raise RecordError("DR replica.points: expected a list of at most 10000")
        replica = from_fields(DrReplica, obj, "DR replica", points=tuple(
            from_fields(DrPoint, p, f"DR replica.points[{i}]") for i, p in enumerate(points)),
            contact=from_fields(DrContact, obj.get("contact", {}), "DR replica.contact"))
        if not (valid_name(replica.pool) and valid_name(replica.vm) and valid_name(replica.host)):
            raise RecordError("DR replica: invalid pool, VM or host name")
        return replica


@dataclass(frozen=True)
class DrTest:
    """A test failover asked at the DR site (`ftvm dr test`): the host keeping the VM's points
    starts a copy of point `point` as VM `test_vm`, isolated; `dr test-end` deletes this
    record and that host stops and removes the copy. No lease."""

    pool: str
    vm: str
    point: int
    host: str
    test_vm: str
    asked_at: float


@dataclass(frozen=True)
class DrFigures:
    """A VM's DR replication as the host shipping its points sees it (lease-bound: the owner,
    or a level 3 VM's partner, whose replica the points are cut from)."""

    target: str
    receiver: str = ""          # the one that answered
    newest: int = 0             # newest point the DR site has from this owner (0: none yet)
    newest_taken_at: float = 0.0
    kind: str = ""              # how the newest point went: "incremental" | "diff"
    data_bytes: int = 0         # disk content in it
    wire_bytes: int = 0         # bytes sent for it
    seconds: float = 0.0        # cut -> the receiver's ACK
    since: float = 0.0          # this owner started replicating (lag counts from here before a point)
    error: str = ""             # the last point's failure, "" when it went
    sent_bytes: int = 0         # totals of this owner's session
    written_bytes: int = 0
    source: str = ""            # the host shipping, and from what: "h2 (partner's replica)"


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
    tracking: str = ""        # how changed RAM pages are found: "exact: ..." or "page compare: why"
    full_resyncs: int = 0     # checkpoints that sent all of RAM (a failed dirty-page scan)
    disk_tracking: str = ""   # how changed disk pages are found: "dirty bitmaps" or "page compare"
    stop_p50_ms: float = 0.0
    cont_p50_ms: float = 0.0
    ack_p50_ms: float = 0.0   # guest resumed -> the partner's ACK: how long output still waits after a pause
    partner_silence_max_ms: float = 0.0  # longest time without a message from the partner (l3_partner_lost)
    output_wait_p50_ms: float = 0.0   # on output: the guest's first held frame -> the checkpoint's start
    reply_p50_ms: float = 0.0         # an ACK's release -> the guest's next held frame (clients + guest work)
    frames_p50: float = 0.0           # frames let out per ACK
    # the checkpoint link: bytes before compression (link_bytes_per_s: on the wire), whether
    # it compresses, and the share of the time checkpoints waited for acknowledgements
    # before they began (the link is slower than the guest dirties memory: l3/primary.py)
    raw_bytes_per_s: float = 0.0
    compressed: bool = False
    link_bound: float = 0.0
    link_wait_p50_ms: float = 0.0


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
    overwrite: bool = False    # the operator allowed disk_paths to replace existing images

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["disk_paths"] = list(self.disk_paths)
        return d

    @staticmethod
    def from_json(d: object) -> LevelChange:
        return from_fields(LevelChange, d, "level change")


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
    guest: "GuestRecord | None" = None  # the guest's own failures, and whether ftvm gave up on it
    dr: DrFigures | None = None         # DR replication, as its owner reports it
    dr_confirmed: DrConfirmation | None = None  # the DR site's last word that it has not taken it over

    def copy_state(self, host: str) -> "CopyState | None":
        """Level 2: the state of `host`'s copy, None if it holds none."""
        c = self.copies.state_of(host) if self.copies else None
        return c.state if c else None


@dataclass(frozen=True)
class BadRecord:
    """A value in the store no agent can use (malformed, or from a newer ftvm)."""

    key: str
    revision: int   # its mod_revision: one event per bad value, not per tick
    reason: str


@dataclass(frozen=True)
class FrozenVm:
    """A VM with a record that decides what may be done to it (spec, owner, copies,
    exports, ...) that cannot be read. Nothing is started, claimed or moved until the
    record is fixed; a copy running here keeps running while this host still owns it."""

    name: str
    problem: BadRecord
    owner_token: int | None = None   # the owner key's create_revision, readable even when its value is not

    @property
    def reason(self) -> str:
        part = self.problem.key.split("/vms/", 1)[-1].split("/", 1)[-1]  # spec, owner, export/h2, ...
        return f"record {part} unreadable: {self.problem.reason}"


@dataclass(frozen=True)
class PoolSnapshot:
    revision: int
    hosts: dict[str, HostInfo]
    vms: dict[str, VmView]
    # A-link health reported by each host: host -> peer -> interface -> up?
    links: dict[str, dict[str, dict[str, bool]]] = field(default_factory=dict)
    maintenance: frozenset[str] = frozenset()  # hosts an operator put in maintenance: nothing placed there
    frozen: dict[str, FrozenVm] = field(default_factory=dict)  # VMs left alone: a record is unreadable
    bad: tuple[BadRecord, ...] = ()  # every unreadable value (frozen VMs' and those read as absent)
    dr_targets: dict[str, DrTarget] = field(default_factory=dict)  # where DR points may go
    dr_replicas: dict[tuple[str, str], DrReplica] = field(default_factory=dict)  # (pool, vm): points kept here
    dr_tests: dict[tuple[str, str], DrTest] = field(default_factory=dict)  # (pool, vm): test failovers asked
    dr_failovers: dict[tuple[str, str], DrFailover] = field(default_factory=dict)  # (pool, vm): started here

    def holding_frozen(self, previous: PoolSnapshot | None) -> PoolSnapshot:
        """This snapshot with each frozen VM's last readable view kept (from `previous`), so
        that what already runs for it (replication, checkpoints) carries on unchanged; the
        decision core still sees it frozen and starts nothing new."""
        if not self.frozen or previous is None:
            return self
        kept = {n: previous.vms[n] for n in self.frozen if n in previous.vms}
        return replace(self, vms=self.vms | kept) if kept else self

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
    guest_failure: str | None = None  # the guest failed on its own (panic, watchdog, probe): the cause
    yielded: str | None = None  # stopped so the VM's preferred site carries on (core/sites.py): why


@dataclass(frozen=True)
class LocalStandby:
    """A level 3 replica this host keeps for a VM running elsewhere (agent/l3.py)."""

    name: str
    committed_epoch: int | None  # the checkpoint its files hold, of the session now feeding it
    silent_s: float              # how long the primary has sent nothing (its own work not counted)


@dataclass(frozen=True)
class LocalView:
    host: str
    vms: dict[str, LocalVm] = field(default_factory=dict)
    exports: frozenset[str] = frozenset()  # level 2 VMs whose copy this host serves
    standbys: dict[str, LocalStandby] = field(default_factory=dict)  # level 3 replicas kept here
    now: float = 0.0  # wall clock of this look (0: rules that need the time are off)
