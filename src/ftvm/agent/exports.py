"""Level 2 partner duty: serving this host's copy of a VM's disks to the VM's owner, over
NBD with TLS (nbdkit or qemu-storage-daemon: qemu/copy_server.py), as QEMU's unprivileged
user, announced in the store under this host's lease. Made empty if this host has none: the owner is told (`fresh`)
and resyncs it in full."""

from __future__ import annotations

import asyncio
from contextlib import suppress

from ..core.model import Export, PoolSnapshot, VmSpec
from ..qemu.blockgraph import LocalImage
from ..qemu.copy_server import StableServer, build_stable_filter
from ..qemu.runas import RunAs
from ..qemu.storage_daemon import StorageDaemon, StorageDaemonError, ensure_image
from ..qemu.tls import QemuTls
from ..store.etcd import EtcdError
from .config import AgentConfig
from .context import HostContext
from .disks import HostDisks


class Exports:
    def __init__(self, cfg: AgentConfig, ctx: HostContext, disks: HostDisks, tls: QemuTls | None,
                 run_as: RunAs | None) -> None:
        self.cfg, self.ctx, self.disks, self.tls, self.run_as = cfg, ctx, disks, tls, run_as
        self.stable: StableServer | None = None  # nbdkit and its filter, once built (agent start)
        self.served: dict[str, StorageDaemon] = {}
        self.records: dict[str, tuple[Export, int]] = {}  # what the store was told of each, under which lease

    async def prepare(self) -> str:
        """Build nbdkit's filter if this host can (agent start); says which server copies get."""
        if not self.cfg.replication_addr:
            return "serves no level 2 copies (no replication_addr)"
        self.stable, why = await asyncio.to_thread(build_stable_filter, self.cfg.state_dir / "lib")
        return why

    def names(self) -> frozenset[str]:
        return frozenset(self.served)

    def images(self) -> list[tuple[str, list[LocalImage]]]:
        """The copies served, by VM (their write-through attribute is checked)."""
        return [(name, daemon.images) for name, daemon in self.served.items()]

    async def serve(self, spec: VmSpec, why: str) -> None:
        vm, event = spec.name, self.ctx.journal.event
        if not self.cfg.replication_addr:
            event(vm, "error", "cannot serve a level 2 copy: no replication_addr configured")
            return
        try:
            images = [self.disks.image(spec, i) for i in range(len(spec.disks))]
            # a list, not a generator: any() would stop at the first image made and skip the rest
            fresh = any([ensure_image(img, disk.size) for img, disk in zip(images, spec.disks, strict=True)])
            images = [self.disks.writable(img) for img in images]
            assert self.tls is not None  # replication_addr needs the pool secret (config)
            daemon = await StorageDaemon.start(vm, images, self.cfg.replication_addr,
                                               self.cfg.state_dir / "vms" / vm / "export.log", self.tls,
                                               self.run_as, self.cfg.state_dir / "export-tls" / vm, self.stable)
        except StorageDaemonError as e:
            event(vm, "error", f"cannot serve this host's copy: {e}")
            return
        self.served[vm] = daemon
        record = Export(self.cfg.name, daemon.addr, daemon.port, fresh)
        self.records[vm] = (record, self.ctx.lease)
        await self.ctx.store.publish_export(vm, record, self.ctx.lease)
        event(vm, "export", f"{why} on {daemon.addr}:{daemon.port} ({daemon.kind})"
                            + (" (new empty copy: needs a full resync)" if fresh else ""))

    async def withdraw(self, vm: str, why: str | None = None) -> None:
        """Stop serving the VM's copy (this host is to run the VM on it, or it is no longer
        a partner); `why` makes an event of it."""
        daemon = self.served.pop(vm, None)
        self.records.pop(vm, None)
        if daemon is not None:
            await daemon.stop()
        elif why is None:
            return  # nothing served, nothing announced
        with suppress(EtcdError):
            await self.ctx.store.withdraw_export(vm, self.cfg.name)
        if why is not None:
            self.ctx.journal.event(vm, "unexport", f"stopped serving this host's copy: {why}")

    async def republish(self, snapshot: PoolSnapshot) -> None:
        """Export records live under this host's lease: after the lease expired (cut off from
        the quorum service, then back with a new one) they are gone while the daemons still
        serve. Tell the store again, or the owner would never resync the copy."""
        for vm, (record, lease) in list(self.records.items()):
            view = snapshot.vms.get(vm)
            if (lease == self.ctx.lease or view is None or vm not in self.served
                    or any(e.host == self.cfg.name for e in view.exports)):
                continue
            with suppress(EtcdError):
                await self.ctx.store.publish_export(vm, record, self.ctx.lease)
                self.records[vm] = (record, self.ctx.lease)
                self.ctx.journal.event(vm, "export", f"serving this host's copy on {record.addr}:{record.port} "
                                                     "again (announced under the host's new lease)")

    def forget_dead(self) -> None:
        for name, daemon in list(self.served.items()):
            if not daemon.alive:
                self.served.pop(name)
                self.records.pop(name, None)
                self.ctx.journal.event(name, "error", f"the server of this host's copy: {daemon.hung}" if daemon.hung
                                       else f"the server of this host's copy ({daemon.kind}) died")
