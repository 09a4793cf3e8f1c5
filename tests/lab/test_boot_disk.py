"""VMs that boot like real servers, against a real lab pool: BIOS, the disk's own boot
loader (syslinux, from Debian packages), no `--kernel`, at levels 1, 2 and 3 (levels 2 and
3 import the image into each host's copy); each moves live to the other host with a client
writing, nothing acknowledged is lost, and `vm stop` shuts the guest down over ACPI."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import BootSpec, Desired, DiskSpec, Level, NicSpec, VmSpec
from ftvm.guest.bootdisk import make_boot_disk
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, l3_protected, replica_current

pytestmark = pytest.mark.lab


def _ip(index: int) -> str:
    return topo.vm_addr(index).split("/")[0]


def test_vms_boot_from_their_own_disk_at_every_level_and_move_live(lab: labmod.LabState, guest_image,
                                                                    tmp_path: Path) -> None:
    pool = LabPool(lab)
    vms = [("bd1", 70, Level.RESTART), ("bd2", 71, Level.COMPONENT), ("bd3", 72, Level.SYSTEM)]
    offsets = {}
    for name, index, level in vms:
        disk = make_boot_disk(lab.shared_dir / f"{name}-boot.img", guest_image, topo.vm_addr(index))
        offsets[name] = disk.ledger_offset
        d = DiskSpec(str(disk.path), "raw")
        spec = VmSpec(name, level, 256, 1, (ops.with_image_size(d) if level.has_copies else d,),
                      (NicSpec(f"52:54:00:77:01:{index:02x}", topo.vm_addr(index)),), BootSpec(),
                      desired=Desired.RUNNING, preferred_host="h1")
        pool.run(lambda s, spec=spec: ops.define(s, spec))  # checked as `vm add` checks it
    try:
        for name, index, level in vms:
            pool.wait_running(name, 60)
            pool.wait_answering(_ip(index), 120)
            if level is Level.COMPONENT:
                pool.wait_for(f"{name}'s replica in sync", replica_current(name), 120)
            if level is Level.SYSTEM:
                pool.wait_for(f"{name} protected", l3_protected(name), 180)
            serial = (lab.host_dir("h1") / "state" / "vms" / name / "serial.log").read_text(errors="replace")
            assert "SYSLINUX" in serial and "starting ledger on /dev/vda2" in serial, serial[-2000:]
        for name, index, level in vms:
            client = LabClient(lab, _ip(index), name, 0.02, reply_timeout=60)
            try:
                client.wait_acks(20, 30)
                pool.run(lambda s, n=name: ops.migrate(s, n, "h2"))
                pool.wait_for(f"{name} on h2", lambda s, n=name: s.vms[n].owner is not None
                              and s.vms[n].owner.host == "h2" and s.vms[n].migration is None, 180)
                client.wait_acks(20, 60, after=time.time())
            finally:
                acks = client.stop()
            view = pool.snapshot().vms[name]
            assert view.owner is not None and view.owner.host == "h2"
            if level is Level.RESTART:
                disk = Path(view.spec.disks[0].path)
            elif level is Level.COMPONENT:
                disk = pool.copy_as_raw(name, "h2", tmp_path / f"{name}.raw")
            else:
                disk = pool.copy_path(name, "h2")[0]
            on_disk, lost = check_acked_on_disk(disk, acks, offsets[name])
            assert lost == [] and len(acks) >= 40, (name, len(acks), lost)
            assert not [e for e in pool.events() if e.vm == name and e.kind in ("guest-restart", "fence")]
        # `vm stop`: the guest is asked over ACPI and powers itself off
        t0 = time.time()
        assert pool.run(lambda s: ops.set_desired(s, "bd1", Desired.STOPPED))
        stops = pool.wait_events("bd1 shut down", lambda e: e.vm == "bd1" and e.kind == "stop" and e.time > t0
                                 and "asked to power off" not in e.message, 90)
        assert "the guest powered off after" in stops[0].message, stops
    finally:
        for name, _, _ in vms:
            pool.stop_and_remove(name)
