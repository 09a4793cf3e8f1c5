"""The store contract: every piece of cluster state ftvm keeps in etcd.

Key layout under /ftvm/<pool>/ (values are JSON):

    state/hosts/<host>        HostInfo    lease: the host's lease (present = host alive)
    state/vms/<vm>/spec       VmSpec      no lease; created and changed by compare-and-set
    state/vms/<vm>/owner      {host}      lease: the owner host's lease. Its create_revision
                                          is the VM's FENCING TOKEN
    state/vms/<vm>/status     VmStatus    lease: the owner's; written only while the writer
                                          still owns the VM with the same token
    state/vms/<vm>/home       {host}      no lease; the host that last claimed the VM
    state/vms/<vm>/copies     Copies      no lease; level 2: which host holds a current copy
                                          (core/replication.py); changed only by the owner
                                          under its token, or in the claim transaction
    state/vms/<vm>/export/<h> Export      lease: h's; h serves its copy over NBD
    state/vms/<vm>/sync       progress    lease: the owner's; resync of the partner's copy
    state/vms/<vm>/checkpoints figures    lease: the owner's; level 3 engine figures
    state/vms/<vm>/dr         DrFigures   lease: the shipping host's (owner, or level 3 partner); DR (dr/sender.py)
    state/dr-targets/<name>   DrTarget    no lease; another pool's DR receivers (`ftvm dr target add`)
    state/dr-replicas/<pool>/<vm>  DrReplica  lease: the receiving host's; the points it keeps of
                                          another pool's VM (dr/receiver.py)
    state/dr-tests/<pool>/<vm>     DrTest     no lease; a test failover asked (`ftvm dr test`)
    state/dr-failovers/<pool>/<vm> DrFailover no lease; a DR failover asked (`ftvm dr failover`)
    state/vms/<vm>/dr-confirmed    DrConfirmation  no lease; the VM's DR site's last word that it has
                                          not taken it over (a start needs a recent one)
    state/vms/<vm>/migration  Migration   lease: the owner's; a live migration asked / under way
    state/vms/<vm>/incoming   Incoming    lease: the target's; it listens for the migration
    state/vms/<vm>/handover   {host}      lease: the target's; migrated: only it may claim the VM
    state/vms/<vm>/level      LevelChange lease: the owner's; an online level change asked / under way
    state/vms/<vm>/guest      GuestRecord no lease; the guest's own failures (panic, watchdog, probe) and
                                          whether ftvm gave up restarting it; written by the owner
                                          under its token, deleted by an operator's start
    state/maintenance/<host>  {since}     no lease; nothing is placed on the host
    state/vms/<vm>/force      {host}      no lease; operator accepted data loss to start there
    state/vms/<vm>/repair     {host}      no lease; operator: host's failed copy has working storage again
    state/links/<host>        A-links     lease: the host's; {peer: {interface: up?}}
    events/<time>-<host>-<n>  Event       no lease; trimmed to the newest MAX_EVENTS
    history/<vm>/<time>-<host>-<n>  HistoryRecord  no lease; up/down/stopped of each VM, kept
                                          HISTORY_DAYS for availability reports (core/availability.py)

What must be atomic (each is one etcd transaction):
  * claim:   owner absent AND claimer's host key present AND (level 2) copies unchanged
             since the snapshot that showed the claimer's copy current -> put owner
             (claimer's lease) + home + (level 2) the copies record with every other copy
             outdated. A host whose lease expired cannot claim; two claimers cannot both
             win; a copy that became stale meanwhile cannot be promoted.
  * copies:  only if owner.create_revision == token AND copies unchanged (compare-and-set).
  * hand over (live migration, source): owner.create_revision == token AND incoming
             present -> delete owner, status, migration, incoming, checkpoints, sync; put
             handover (target's lease). The claim transaction deletes handover.
  * take over (level 3 partner, fast failover): owner.create_revision == old token AND
             copies unchanged (still naming the partner current) -> delete owner + status,
             put copies with the partner as the only current copy. Races the primary's
             "partner lost" copies write: exactly one wins.
  * status, release, guest: only if owner.create_revision == token (a stale owner changes
             nothing).
  * define:  spec absent -> put spec.   remove: spec unchanged AND owner absent -> delete.
  * register host: host key absent (or held by our own lease) -> put with our lease.

What is lease-bound: host keys, owner keys, status keys. When a host's lease
expires, etcd deletes all three at once; that deletion is what lets another
host claim the VM. The owner self-fences before that moment (core/timing.py).
"""

from __future__ import annotations

import itertools
import json
import os
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

from ..core.model import (BadRecord, CheckpointFigures, Desired, DrConfirmation, DrFailover, DrFigures, DrReplica,
                          DrTarget, DrTest, Export, FrozenVm, HostInfo, Incoming, LevelChange, Migration, Ownership,
                          PoolSnapshot, SyncProgress, VmSpec, VmStatus, VmView, valid_name)
from ..core.availability import HistoryRecord
from ..core.guest_failures import GuestRecord
from ..core.records import RecordError, as_object, from_fields, value
from ..core.replication import Copies
from .etcd import (Compare, EtcdClient, EtcdError, KeyValue, absent, created_at, modified_at, present, put_json, Delete,
                   Get, Put)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_EVENTS = 5000
MAX_VALUE = 1 << 20  # no record ftvm writes comes near this
HISTORY_DAYS = 400


@dataclass(frozen=True)
class Event:
    time: float
    host: str
    vm: str
    kind: str
    message: str

    def __str__(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + f".{int(self.time * 1000) % 1000:03d}"
        return f"{stamp} {self.host:<6} {self.vm or '-':<10} {self.kind:<10} {self.message}"


class OwnershipLost(RuntimeError):
    """An owner's write found that it no longer owns the VM under its fencing token (or the
    record it meant to change is gone): whatever it runs of the VM must stop."""


class UnreadableRecord(EtcdError):
    """A record read on its own (spec, copies) that cannot be used. An EtcdError, so the
    agent's loops treat it like a store they cannot read now: they change nothing and
    try again later; front ends show the reason."""


class PoolStore:
    def __init__(self, client: EtcdClient, pool: str) -> None:
        self.etcd = client
        self.pool = pool
        self.root = f"/ftvm/{pool}/"
        self.state = self.root + "state/"
        self._seq = itertools.count()
        self._parsed: VmParses = {}  # (each tick parses only the VMs whose records changed)

    # --- keys --------------------------------------------------------------------
    def host_key(self, host: str) -> str:
        return f"{self.state}hosts/{host}"

    def vm_key(self, vm: str, part: str) -> str:
        return f"{self.state}vms/{vm}/{part}"

    # --- reading -----------------------------------------------------------------
    async def snapshot(self) -> PoolSnapshot:
        """The whole pool state at one revision. Each value is parsed on its own: one that
        cannot be read freezes its VM (or, for a host, leaves that host out) and is listed
        in `bad`; it never stops the others from being read (core/records.py)."""
        kvs, revision = await self.etcd.get_prefix(self.state)
        return parse_snapshot(self.state, kvs, revision, self._parsed)

    async def spec(self, vm: str) -> tuple[VmSpec, int] | None:
        kv = await self.etcd.get(self.vm_key(vm, "spec"))
        return (_parsed(kv, VmSpec.from_json), kv.mod_revision) if kv else None

    # --- hosts -------------------------------------------------------------------
    async def register_host(self, info: HostInfo, lease: int) -> bool:
        """Publish a live host under its lease. False if another live agent already uses the name."""
        key = self.host_key(info.name)
        r = await self.etcd.txn([absent(key)], [put_json(key, info.to_json(), lease)])
        if r.succeeded:
            return True
        kv = await self.etcd.get(key)
        if kv is not None and kv.lease == lease:
            await self.etcd.put(key, json.dumps(info.to_json()).encode(), lease)
            return True
        return False

    async def host_lease_left(self, host: str) -> tuple[int, int] | None:
        """Seconds left of a live host's lease and its granted TTL (None: the host is gone).
        SplitSite: whether a host still renews its lease, which only it can do, tells a cut
        from a lost site (core/sites.py)."""
        kv = await self.etcd.get(self.host_key(host))
        if kv is None or not kv.lease:
            return None
        left, granted = await self.etcd.lease_time_to_live(kv.lease)
        return None if left < 0 else (left, granted)

    # --- ownership (the fencing protocol) ----------------------------------------
    async def claim(self, vm: str, host: str, lease: int, copies_seen: Copies | None = None,
                    copies_new: Copies | None = None) -> int | None:
        """Take ownership of an unowned VM. Returns the fencing token, or None if we lost.
        Level 2: `copies_seen` is the record the decision was based on (None: there was
        none); `copies_new` replaces it in the same transaction."""
        owner = self.vm_key(vm, "owner")
        compare = [absent(owner), present(self.host_key(host)), present(self.vm_key(vm, "spec"))]
        success: list[Put | Delete | Get] = [put_json(owner, {"host": host}, lease),
                                             put_json(self.vm_key(vm, "home"), {"host": host})]
        success.append(Delete(self.vm_key(vm, "handover")))
        if copies_new is not None:
            compare.append(self._copies_unchanged(vm, copies_seen))
            success.append(put_json(self.vm_key(vm, "copies"), copies_new.to_json()))
            success.append(Delete(self.vm_key(vm, "force")))
        r = await self.etcd.txn(compare, success)
        return r.revision if r.succeeded else None

    def _copies_unchanged(self, vm: str, seen: Copies | None) -> Compare:
        key = self.vm_key(vm, "copies")
        return absent(key) if seen is None or not seen.revision else modified_at(key, seen.revision)

    async def set_copies(self, vm: str, token: int, seen: Copies, new: Copies) -> Copies | None:
        """Owner-only compare-and-set of the copies record. Returns it with its new revision."""
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token), self._copies_unchanged(vm, seen)],
                                [put_json(self.vm_key(vm, "copies"), new.to_json())])
        if not r.succeeded:
            return None
        return Copies(new.gen, new.copies, r.revision)

    async def update_copies(self, vm: str, token: int, change: Callable[[Copies], Copies | None]) -> Copies:
        """The owner's read-modify-write of the copies record: `change` gets the record as
        stored and returns the new one (None: nothing to change). Retried when the record
        changed meanwhile; OwnershipLost once this token no longer owns the VM or the record
        is gone. EtcdError is the caller's to retry or not."""
        while True:
            seen = await self.get_copies(vm)
            if seen is None:
                raise OwnershipLost(f"VM {vm} has no copies record")
            new = change(seen)
            if new is None:
                return seen
            stored = await self.set_copies(vm, token, seen, new)
            if stored is not None:
                return stored
            if not await self.owned(vm, token):
                raise OwnershipLost(f"this host no longer owns VM {vm} under token {token}")

    async def owned(self, vm: str, token: int) -> bool:
        """Whether `token` still owns `vm`, as etcd says now (a quorum read)."""
        owner = await self.etcd.get(self.vm_key(vm, "owner"))
        return owner is not None and owner.create_revision == token

    async def get_copies(self, vm: str) -> Copies | None:
        kv = await self.etcd.get(self.vm_key(vm, "copies"))
        return _parsed(kv, lambda d: Copies.from_json(d, kv.mod_revision)) if kv else None

    async def report_links(self, host: str, links: dict[str, dict[str, bool]], lease: int) -> None:
        await self.etcd.put(f"{self.state}links/{host}", json.dumps(links, sort_keys=True).encode(), lease)

    async def publish_export(self, vm: str, export: Export, lease: int) -> None:
        await self.etcd.put(self.vm_key(vm, f"export/{export.host}"),
                            json.dumps({"host": export.host, "addr": export.addr, "port": export.port,
                                        "fresh": export.fresh}).encode(),
                            lease)

    async def withdraw_export(self, vm: str, host: str) -> None:
        await self.etcd.delete(self.vm_key(vm, f"export/{host}"))

    async def report_sync(self, vm: str, token: int, progress: SyncProgress | None, lease: int) -> None:
        key = self.vm_key(vm, "sync")
        op = put_json(key, progress.__dict__, lease) if progress else Delete(key)
        await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token)], [op])

    async def report_checkpoints(self, vm: str, token: int, figures: CheckpointFigures | None,
                                 lease: int) -> None:
        key = self.vm_key(vm, "checkpoints")
        op = put_json(key, figures.__dict__, lease) if figures else Delete(key)
        await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token)], [op])

    async def report_dr(self, vm: str, token: int, figures: DrFigures | None, lease: int) -> None:
        key = self.vm_key(vm, "dr")
        op = put_json(key, figures.__dict__, lease) if figures else Delete(key)
        await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token)], [op])

    async def set_dr_target(self, target: DrTarget) -> None:
        await self.etcd.put(f"{self.state}dr-targets/{target.name}", json.dumps(target.to_json()).encode())

    async def publish_dr_replica(self, replica: DrReplica, lease: int) -> None:
        await self.etcd.put(f"{self.state}dr-replicas/{replica.pool}/{replica.vm}",
                            json.dumps(replica.to_json()).encode(), lease)

    async def request_dr_test(self, test: DrTest) -> bool:
        """Only if no test of that VM is asked already."""
        key = f"{self.state}dr-tests/{test.pool}/{test.vm}"
        r = await self.etcd.txn([absent(key)], [put_json(key, test.__dict__)])
        return r.succeeded

    async def end_dr_test(self, pool: str, vm: str) -> bool:
        return await self.etcd.delete(f"{self.state}dr-tests/{pool}/{vm}") > 0

    async def confirm_dr(self, vm: str, confirmation: DrConfirmation) -> None:
        await self.etcd.put(self.vm_key(vm, "dr-confirmed"), json.dumps(confirmation.__dict__).encode())

    async def mark_dr_failed_over(self, vm: str, why: str) -> bool:
        """The DR site runs the VM now: stop it here and never start it again (spec.dr_failed_over).
        False if the spec changed meanwhile (read it again)."""
        got = await self.spec(vm)
        if got is None or got[0].dr_failed_over:
            return True
        spec, revision = got
        return await self.update_spec(replace(spec, desired=Desired.STOPPED, dr_failed_over=why), revision)

    async def request_dr_failover(self, failover: DrFailover) -> bool:
        """Only if none of that VM was asked before."""
        key = f"{self.state}dr-failovers/{failover.pool}/{failover.vm}"
        r = await self.etcd.txn([absent(key)], [put_json(key, failover.__dict__)])
        return r.succeeded

    async def dr_failover_asked(self, pool: str, vm: str) -> bool:
        """Whether a failover of `pool`'s VM `vm` to this pool was asked (a quorum read)."""
        return await self.etcd.get(f"{self.state}dr-failovers/{pool}/{vm}") is not None

    async def update_dr_failover(self, failover: DrFailover) -> None:
        await self.etcd.put(f"{self.state}dr-failovers/{failover.pool}/{failover.vm}",
                            json.dumps(failover.__dict__).encode())

    async def fail_back(self, spec: VmSpec, revision: int, copies: Copies | None) -> bool:
        """The VM came back from its DR site (its images installed here): its spec (no longer
        failed over, to run) and, level 2-3, its copies, in one transaction; only if nobody
        runs it and the spec is unchanged."""
        ops: list[Put | Delete | Get] = [put_json(self.vm_key(spec.name, "spec"), spec.to_json())]
        if copies is not None:
            ops.append(put_json(self.vm_key(spec.name, "copies"), copies.to_json()))
        r = await self.etcd.txn([modified_at(self.vm_key(spec.name, "spec"), revision),
                                 absent(self.vm_key(spec.name, "owner"))], ops)
        return r.succeeded

    async def withdraw_dr_replica(self, pool: str, vm: str) -> None:
        await self.etcd.delete(f"{self.state}dr-replicas/{pool}/{vm}")

    async def end_dr_failover(self, pool: str, vm: str) -> bool:
        return await self.etcd.delete(f"{self.state}dr-failovers/{pool}/{vm}") > 0

    async def remove_dr_target(self, name: str) -> bool:
        return await self.etcd.delete(f"{self.state}dr-targets/{name}") > 0

    async def take_over(self, vm: str, old_token: int, copies_seen: Copies, copies_new: Copies) -> bool:
        """Level 3 partner: end the old primary's ownership while its lease may still live,
        if it still owns the VM under `old_token` and the copies record (which says this
        host's replica is current) is unchanged. The primary's own record of losing its
        partner changes that record, so exactly one of the two wins. The caller then
        claims the VM as usual (owner absent)."""
        r = await self.etcd.txn(
            [created_at(self.vm_key(vm, "owner"), old_token), self._copies_unchanged(vm, copies_seen)],
            [Delete(self.vm_key(vm, "owner")), Delete(self.vm_key(vm, "status")),
             Delete(self.vm_key(vm, "checkpoints")),
             put_json(self.vm_key(vm, "copies"), copies_new.to_json())])
        return r.succeeded

    # --- online level changes -----------------------------------------------------------
    async def request_level_change(self, vm: str, change: LevelChange, lease: int) -> bool:
        """Operator: change a running VM's level. Only while the owner still has the token
        and nothing else is under way (no other change, no migration)."""
        key = self.vm_key(vm, "level")
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), change.token), absent(key),
                                 absent(self.vm_key(vm, "migration"))],
                                [put_json(key, change.to_json(), lease)])
        return r.succeeded

    async def update_level_change(self, vm: str, token: int, change: LevelChange, lease: int) -> bool:
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token), present(self.vm_key(vm, "level"))],
                                [put_json(self.vm_key(vm, "level"), change.to_json(), lease)])
        return r.succeeded

    async def end_level_change(self, vm: str) -> None:
        await self.etcd.delete(self.vm_key(vm, "level"))

    async def commit_level_change(self, vm: str, token: int, spec: VmSpec, spec_revision: int,
                                  copies: Copies | None) -> bool:
        """Owner, guest stopped at the switch: the new spec and the copies record that goes
        with it (None: the VM keeps no copies any more), in one transaction, while it still
        owns the VM and the spec is the one it read."""
        ops: list[Put | Delete | Get] = [put_json(self.vm_key(vm, "spec"), spec.to_json()),
                                         Delete(self.vm_key(vm, "level")), Delete(self.vm_key(vm, "sync")),
                                         Delete(self.vm_key(vm, "checkpoints"))]
        ops.append(put_json(self.vm_key(vm, "copies"), copies.to_json()) if copies is not None
                   else Delete(self.vm_key(vm, "copies")))
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token),
                                 modified_at(self.vm_key(vm, "spec"), spec_revision)], ops)
        return r.succeeded

    # --- live migration ----------------------------------------------------------------
    async def request_migration(self, vm: str, owner_token: int, migration: Migration, lease: int) -> bool:
        """Operator: move the running VM. Only while the owner still has `owner_token` and no
        other migration is pending; lease-bound to the owner (a lost owner drops it)."""
        key = self.vm_key(vm, "migration")
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), owner_token), absent(key),
                                 absent(self.vm_key(vm, "level"))],
                                [put_json(key, migration.__dict__, lease)])
        return r.succeeded

    async def update_migration(self, vm: str, token: int, migration: Migration, lease: int) -> bool:
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token),
                                 present(self.vm_key(vm, "migration"))],
                                [put_json(self.vm_key(vm, "migration"), migration.__dict__, lease)])
        return r.succeeded

    async def end_migration(self, vm: str) -> None:
        await self.etcd.delete(self.vm_key(vm, "migration"))

    async def publish_incoming(self, vm: str, incoming: Incoming, lease: int) -> bool:
        """Target: listening for the migration (only while it is still requested)."""
        r = await self.etcd.txn([present(self.vm_key(vm, "migration"))],
                                [put_json(self.vm_key(vm, "incoming"), incoming.__dict__, lease)])
        return r.succeeded

    async def withdraw_incoming(self, vm: str) -> None:
        await self.etcd.delete(self.vm_key(vm, "incoming"))

    async def hand_over(self, vm: str, token: int, target: str, target_lease: int,
                        copies_seen: Copies | None = None) -> bool:
        """Source, its guest paused with every byte sent: give the VM to `target`, if we still
        own it and the target still listens (and, level 2, the copies record is still
        `copies_seen`). Only the target may claim it next (the handover key lives on the
        target's lease: if the target dies, the VM fails over as usual)."""
        compare = [created_at(self.vm_key(vm, "owner"), token), present(self.vm_key(vm, "incoming"))]
        if copies_seen is not None:
            compare.append(self._copies_unchanged(vm, copies_seen))
        r = await self.etcd.txn(
            compare,
            [Delete(self.vm_key(vm, "owner")), Delete(self.vm_key(vm, "status")),
             Delete(self.vm_key(vm, "migration")), Delete(self.vm_key(vm, "incoming")),
             # the source's own figures go with its ownership: read after the move, they
             # would describe a replica the new owner has not built yet
             Delete(self.vm_key(vm, "checkpoints")), Delete(self.vm_key(vm, "sync")), Delete(self.vm_key(vm, "dr")),
             put_json(self.vm_key(vm, "handover"), {"host": target}, target_lease)])
        return r.succeeded

    async def set_maintenance(self, host: str, on: bool, reason: str = "") -> None:
        key = f"{self.state}maintenance/{host}"
        if on:
            await self.etcd.put(key, json.dumps({"since": time.time(), "reason": reason}).encode())
        else:
            await self.etcd.delete(key)

    async def request_repair(self, vm: str, host: str) -> bool:
        """Operator: `host`'s failed copy sits on storage that works again."""
        r = await self.etcd.txn([present(self.vm_key(vm, "spec"))],
                                [put_json(self.vm_key(vm, "repair"), {"host": host})])
        return r.succeeded

    async def clear_repair(self, vm: str) -> None:
        await self.etcd.delete(self.vm_key(vm, "repair"))

    async def force_start(self, vm: str, host: str) -> bool:
        """Operator: allow `host` to start the VM from its copy even if outdated."""
        r = await self.etcd.txn([present(self.vm_key(vm, "spec")), absent(self.vm_key(vm, "owner"))],
                                [put_json(self.vm_key(vm, "force"), {"host": host})])
        return r.succeeded

    async def report_status(self, vm: str, status: VmStatus, lease: int) -> bool:
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), status.token)],
                                [put_json(self.vm_key(vm, "status"), status.to_json(), lease)])
        return r.succeeded

    async def record_guest(self, vm: str, token: int, record: GuestRecord) -> bool:
        """The guest's failures and verdict (core/guest_failures.py), only while `token` still
        owns the VM. False if it no longer does."""
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token)],
                                [put_json(self.vm_key(vm, "guest"), record.to_json())])
        return r.succeeded

    async def clear_guest(self, vm: str) -> None:
        """An operator's start: the guest's failures are forgotten, it may be started again."""
        await self.etcd.delete(self.vm_key(vm, "guest"))

    async def release(self, vm: str, token: int) -> bool:
        r = await self.etcd.txn([created_at(self.vm_key(vm, "owner"), token)],
                                [Delete(self.vm_key(vm, "owner")), Delete(self.vm_key(vm, "status"))])
        return r.succeeded

    # --- VM definitions ----------------------------------------------------------
    async def define_vm(self, spec: VmSpec) -> bool:
        """Define a new VM (False if the name is taken), with a fresh definition id."""
        if not spec.definition:
            spec = replace(spec, definition=os.urandom(8).hex())
        key = self.vm_key(spec.name, "spec")
        r = await self.etcd.txn([absent(key)], [put_json(key, spec.to_json())])
        return r.succeeded

    async def update_spec(self, spec: VmSpec, expected_revision: int) -> bool:
        key = self.vm_key(spec.name, "spec")
        r = await self.etcd.txn([modified_at(key, expected_revision)], [put_json(key, spec.to_json())])
        return r.succeeded

    async def remove_vm(self, vm: str, expected_revision: int) -> bool:
        """Delete a VM definition; only if unchanged and nobody owns (runs) it."""
        r = await self.etcd.txn(
            [modified_at(self.vm_key(vm, "spec"), expected_revision), absent(self.vm_key(vm, "owner"))],
            [Delete(f"{self.state}vms/{vm}/", prefix=True)])
        return r.succeeded

    # --- events ------------------------------------------------------------------
    async def add_event(self, event: Event) -> None:
        key = f"{self.root}events/{int(event.time * 1e6):020d}-{event.host}-{next(self._seq)}"
        await self.etcd.put(key, json.dumps(asdict(event)).encode())

    async def events(self, limit: int = 50, since_revision: int = 0) -> tuple[list[Event], int]:
        """The newest `limit` events (changed after `since_revision`), oldest first."""
        kvs, revision = await self.etcd.get_prefix(self.root + "events/", last=limit,
                                                   min_mod_revision=since_revision + 1 if since_revision else 0)
        return [e for e in map(_event, kvs) if e is not None], revision

    async def trim_events(self) -> int:
        """Delete all but the newest MAX_EVENTS events. Returns how many went."""
        kvs, _ = await self.etcd.get_prefix(self.root + "events/")
        old = kvs[:-MAX_EVENTS] if len(kvs) > MAX_EVENTS else []
        for kv in old:
            await self.etcd.delete(kv.key)
        return len(old)


    # --- history (availability) ----------------------------------------------------
    async def add_history(self, vm: str, rec: HistoryRecord) -> None:
        key = f"{self.root}history/{vm}/{int(rec.t * 1e6):020d}-{rec.host}-{next(self._seq)}"
        await self.etcd.put(key, json.dumps(rec.to_json()).encode())

    async def history(self, vm: str | None = None) -> dict[str, list[HistoryRecord]]:
        """Every VM's (or one VM's) history records, oldest first."""
        kvs, _ = await self.etcd.get_prefix(f"{self.root}history/{vm + '/' if vm else ''}")
        out: dict[str, list[HistoryRecord]] = {}
        for kv in kvs:
            name = kv.key[len(self.root + "history/"):].split("/")[0]
            try:
                out.setdefault(name, []).append(HistoryRecord.from_json(_json(kv)))
            except RecordError as e:
                log.warning("history record %s skipped: %s", kv.key, e)
        return out

    async def trim_history(self, older_than: float) -> int:
        """Delete history records older than `older_than` (epoch seconds), keeping each VM's
        newest older record (it gives the VM's state at the start of what is kept)."""
        gone = 0
        for vm, recs in (await self.history()).items():
            old = [r for r in recs if r.t < older_than][:-1]
            for r in old:
                await self.etcd.delete(f"{self.root}history/{vm}/{int(r.t * 1e6):020d}-{r.host}-", prefix=True)
                gone += 1
        return gone


def _json(kv: KeyValue) -> Any:
    if len(kv.value) > MAX_VALUE:
        raise RecordError(f"{len(kv.value)} bytes is larger than any record ({MAX_VALUE})")
    try:
        return json.loads(kv.value)
    except ValueError as e:
        raise RecordError(f"not JSON ({e})") from None


def _parsed(kv: KeyValue, parse: Callable[[Any], T]) -> T:
    try:
        return parse(_json(kv))
    except RecordError as e:
        raise UnreadableRecord(f"record {kv.key} is unreadable: {e}; fix or delete it") from None


def _event(kv: KeyValue) -> Event | None:
    try:
        return from_fields(Event, _json(kv), "event")
    except RecordError as e:
        log.warning("event %s skipped: %s", kv.key, e)
        return None


def _host_of(d: object, what: str) -> str:
    """The {"host": name} records (owner, home, force, repair, handover)."""
    host = value(str, as_object(d, what).get("host"), f"{what}.host")
    if not valid_name(host):
        raise RecordError(f"{what}.host: invalid host name {host!r}")
    return str(host)


# The parts of a VM that only its owner writes, for display and figures: an unreadable one
# is read as absent (the owner writes it again). Every other part decides what may be done
# to the VM: an unreadable one freezes it.
_ADVISORY = frozenset({"status", "sync", "checkpoints", "dr",
                       "dr-confirmed"})  # (read as absent: the VM waits for a new confirmation)


# A VM's parse (a host's under "host/NAME", a spec's under "spec/VM"), kept with the (part, mod revision, create
# revision) of each record it came from: a snapshot re-parses only what changed since the last.
VmParses = dict[str, tuple[tuple[tuple[str, int, int], ...], Any, list[BadRecord]]]


def parse_snapshot(state_prefix: str, kvs: list[KeyValue], revision: int,
                   parsed: VmParses | None = None) -> PoolSnapshot:
    hosts: dict[str, HostInfo] = {}
    links: dict[str, dict[str, dict[str, bool]]] = {}
    parts: dict[str, dict[str, Any]] = {}
    maintenance: set[str] = set()
    dr_targets: dict[str, DrTarget] = {}
    dr_replicas: dict[tuple[str, str], DrReplica] = {}
    dr_tests: dict[tuple[str, str], DrTest] = {}
    dr_failovers: dict[tuple[str, str], DrFailover] = {}
    bad: list[BadRecord] = []
    for kv in kvs:
        rest = kv.key[len(state_prefix):].split("/")
        try:
            if rest[0] == "hosts" and len(rest) == 2:
                host_sig = (("host", kv.mod_revision, kv.create_revision),)
                kept = parsed.get(f"host/{rest[1]}") if parsed is not None else None
                if kept is not None and kept[0] == host_sig:
                    hosts[rest[1]] = kept[1]
                    continue
                info = HostInfo.from_json(_json(kv))
                if info.name != rest[1]:
                    raise RecordError(f"names host {info.name!r}, not {rest[1]!r}")
                hosts[rest[1]] = info
                if parsed is not None:
                    parsed[f"host/{rest[1]}"] = (host_sig, info, [])
            elif rest[0] == "links" and len(rest) == 2:
                links[rest[1]] = value(dict[str, dict[str, bool]], _json(kv), "links")
            elif rest[0] == "maintenance" and len(rest) == 2:
                maintenance.add(rest[1])
            elif rest[0] == "dr-replicas" and len(rest) == 3:
                replica = DrReplica.from_json(_json(kv))
                if (replica.pool, replica.vm) != (rest[1], rest[2]):
                    raise RecordError(f"names {replica.pool}/{replica.vm}, not {rest[1]}/{rest[2]}")
                dr_replicas[(rest[1], rest[2])] = replica
            elif rest[0] == "dr-tests" and len(rest) == 3:
                test = from_fields(DrTest, _json(kv), "DR test")
                if (test.pool, test.vm) != (rest[1], rest[2]) or not valid_name(test.test_vm):
                    raise RecordError(f"names {test.pool}/{test.vm}, not {rest[1]}/{rest[2]}")
                dr_tests[(rest[1], rest[2])] = test
            elif rest[0] == "dr-failovers" and len(rest) == 3:
                failover = from_fields(DrFailover, _json(kv), "DR failover")
                if (failover.pool, failover.vm) != (rest[1], rest[2]):
                    raise RecordError(f"names {failover.pool}/{failover.vm}, not {rest[1]}/{rest[2]}")
                dr_failovers[(rest[1], rest[2])] = failover
            elif rest[0] == "dr-targets" and len(rest) == 2:
                target = DrTarget.from_json(_json(kv))
                if target.name != rest[1]:
                    raise RecordError(f"names DR target {target.name!r}, not {rest[1]!r}")
                dr_targets[rest[1]] = target
            elif rest[0] == "vms" and len(rest) in (3, 4):
                if not valid_name(rest[1]):
                    raise RecordError(f"invalid VM name {rest[1]!r} in the key")
                part = rest[2] if len(rest) == 3 else f"export/{rest[3]}"
                parts.setdefault(rest[1], {})[part] = kv
        except RecordError as e:
            bad.append(BadRecord(kv.key, kv.mod_revision, str(e)))
    vms: dict[str, VmView] = {}
    frozen: dict[str, FrozenVm] = {}
    if parsed is not None:
        for gone in set(parsed) - set(parts) - {f"host/{h}" for h in hosts} - {f"spec/{v}" for v in parts}:
            del parsed[gone]
    for name, p in parts.items():
        if "spec" not in p:
            continue  # leftovers of a VM being removed
        sig = tuple(sorted((part, kv.mod_revision, kv.create_revision) for part, kv in p.items()))
        kept = parsed.get(name) if parsed is not None else None
        if kept is not None and kept[0] == sig:
            vms[name] = kept[1]
            bad.extend(kept[2])
            continue
        try:
            before = len(bad)
            vms[name] = _parse_vm(name, p, bad, parsed)
            if parsed is not None:
                parsed[name] = (sig, vms[name], bad[before:])
        except _Frozen as f:
            owner = p.get("owner")
            frozen[name] = FrozenVm(name, f.problem, owner.create_revision if owner else None)
            bad.append(f.problem)
    return PoolSnapshot(revision=revision, hosts=hosts, vms=vms, links=links,
                        maintenance=frozenset(maintenance), frozen=frozen, bad=tuple(bad), dr_targets=dr_targets,
                        dr_replicas=dr_replicas, dr_tests=dr_tests, dr_failovers=dr_failovers)


class _Frozen(Exception):
    def __init__(self, problem: BadRecord) -> None:
        self.problem = problem


def _parse_vm(name: str, p: dict[str, KeyValue], bad: list[BadRecord], parsed: VmParses | None = None) -> VmView:
    def read(part: str, parse: Callable[..., Any], *extra: Any) -> Any:
        kv = p.get(part)
        if kv is None:
            return None
        try:
            return parse(_json(kv), *extra)
        except RecordError as e:
            problem = BadRecord(kv.key, kv.mod_revision, str(e))
            if part in _ADVISORY:
                bad.append(problem)
                return None
            raise _Frozen(problem) from None

    spec_sig = (("spec", p["spec"].mod_revision, p["spec"].create_revision),)
    kept = parsed.get(f"spec/{name}") if parsed is not None else None
    if kept is not None and kept[0] == spec_sig:
        spec = kept[1]  # (a spec seldom changes; the VM's other records often do)
    else:
        spec = read("spec", VmSpec.from_json)
        if parsed is not None:
            parsed[f"spec/{name}"] = (spec_sig, spec, [])
    if spec.name != name:
        raise _Frozen(BadRecord(p["spec"].key, p["spec"].mod_revision, f"names VM {spec.name!r}, not {name!r}"))
    owner_host = read("owner", _host_of, "owner")
    exports = []
    for part in sorted(k for k in p if k.startswith("export/")):
        export = read(part, lambda d: from_fields(Export, d, "export"))
        if export.host != part.split("/", 1)[1]:
            raise _Frozen(BadRecord(p[part].key, p[part].mod_revision, f"names host {export.host!r}"))
        exports.append(export)
    copies_kv = p.get("copies")
    return VmView(
        spec=spec,
        owner=Ownership(owner_host, p["owner"].create_revision) if owner_host else None,
        status=read("status", VmStatus.from_json),
        home=read("home", _host_of, "home"),
        copies=read("copies", Copies.from_json, copies_kv.mod_revision) if copies_kv else None,
        exports=tuple(exports),
        sync=read("sync", lambda d: from_fields(SyncProgress, d, "sync")),
        force_host=read("force", _host_of, "force"),
        repair_host=read("repair", _host_of, "repair"),
        checkpoints=read("checkpoints", lambda d: from_fields(CheckpointFigures, d, "checkpoints")),
        migration=read("migration", lambda d: from_fields(Migration, d, "migration")),
        incoming=read("incoming", lambda d: from_fields(Incoming, d, "incoming")),
        handover_host=read("handover", _host_of, "handover"),
        level_change=read("level", LevelChange.from_json),
        guest=read("guest", GuestRecord.from_json),
        dr=read("dr", lambda d: from_fields(DrFigures, d, "dr")),
        dr_confirmed=read("dr-confirmed", lambda d: from_fields(DrConfirmation, d, "dr-confirmed")),
    )


__all__ = ["PoolStore", "Event", "Put", "MAX_EVENTS", "parse_snapshot", "UnreadableRecord"]
