"""Level 2 acceptance tests in a real lab: quorum-mirrored disks on two hosts'
local storage (raw on h1, qcow2 on h2), real failures, the ledger client writing
throughout. "No guest I/O error" is checked from the client's side: one TCP
connection for the whole test (the ledger would answer ERR, or the guest would
stall for good, on an I/O error) and every acknowledged record on the disk."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from ftvm.core.model import Level, PoolSnapshot
from ftvm.core.protection import protection
from ftvm.core.replication import CopyState
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.faults import clear_disk_failure, fail_disk
from ftvm.lab.observer import CopyObserver
from ftvm.guest.ledger_format import read_records
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, copy_is

pytestmark = pytest.mark.lab
_indexes = itertools.count(20)


def copy_state(snap: PoolSnapshot, vm: str, host: str) -> CopyState | None:
    return snap.vms[vm].copy_state(host)


def in_sync(vm: str, partner: str):
    return lambda s: copy_is(vm, partner, CopyState.CURRENT)(s) and s.vms[vm].status is not None


@pytest.fixture
def l2vm(lab: labmod.LabState, guest_image) -> Iterator[tuple[LabPool, str, str]]:
    """A level 2 ledger VM running on h1, mirrored to h2, answering; removed afterwards."""
    index = next(_indexes)
    name = f"m{index}"
    pool = LabPool(lab)
    pool.define_ledger_vm(name, index, Level.COMPONENT, guest_image, host="h1")
    ip = topo.vm_addr(index).split("/")[0]
    try:
        assert pool.wait_running(name, 60) == "h1"
        pool.wait_answering(ip, 60)
        pool.wait_for("mirrored to h2", in_sync(name, "h2"), 30)
        yield pool, name, ip
    finally:
        for k in (1, 2):
            labmod.set_a_link(lab, "h1", "h2", k, up=True)
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 30)
        pool.stop_and_remove(name)


def protection_of(pool: LabPool, vm: str) -> str:
    from ftvm.core.protection import protection
    snap = pool.snapshot()
    return str(protection(snap, snap.vms[vm]))


def single_connection(client: LabClient) -> None:
    from ftvm.lab.client import read_log
    _, other = read_log(client.log)
    assert [e["kind"] for e in other] == ["connect"], other


# what a guest kernel prints when its memory was corrupted (a stale page after a move)
GUEST_KERNEL_FAILURES = ("I/O error", "kernel BUG", "list_add corruption", "list_del corruption", "Oops",
                         "general protection fault", "Kernel panic")


def no_guest_io_error(client: LabClient, lab: labmod.LabState, vm: str) -> None:
    """The ledger never answered ERR (it does on a failed write) and the guest kernel
    logged no I/O error, and no sign of corrupted memory, on its console."""
    from ftvm.lab.client import read_log
    _, other = read_log(client.log)
    assert not [e for e in other if "unexpected reply" in str(e.get("error"))], other
    for host in lab.hosts:
        serial = lab.host_dir(host) / "state" / "vms" / vm / "serial.log"
        if serial.exists():
            text = serial.read_text(errors="replace")
            assert not [m for m in GUEST_KERNEL_FAILURES if m in text], (host, text[-2000:])


def test_partner_loss_is_masked_then_resynced_incrementally(l2vm, lab: labmod.LabState) -> None:
    pool, name, ip = l2vm
    client = LabClient(lab, ip, name)
    try:
        client.wait_acks(50, 30)
        assert protection_of(pool, name) == "Protected"
        t = time.time()
        labmod.fail_host(lab, "h2")
        pool.wait_for("replica outdated", lambda s: copy_state(s, name, "h2") is CopyState.OUTDATED, 30)
        assert "replica on h2 outdated" in protection_of(pool, name)
        client.wait_acks(50, 30, after=t)
        reply = pool.ask(ip, "F 8192")  # 8 MiB written while the partner is away
        assert reply.startswith("OK F 8388608")
        labmod.restore_host(lab, "h2")
        pool.wait_for("back in sync", in_sync(name, "h2"), 60)
        assert protection_of(pool, name) == "Protected"
        client.wait_acks(20, 30, after=time.time())
    finally:
        acks = client.stop()
    single_connection(client)
    no_guest_io_error(client, lab, name)
    masked = [e for e in pool.events() if e.vm == name and e.kind == "masked"]
    assert masked and "replication to h2 failed" in masked[-1].message
    [done] = pool.wait_events("resync done", lambda e: e.vm == name and e.kind == "in-sync"
                              and e.time > masked[-1].time)
    copied = int(done.message.split("resync copied ")[1].split()[0])
    written = int(done.message.split("(")[1].split()[0])
    assert 8 << 20 <= written and copied <= 1.1 * written, done.message  # only what changed
    assert copied < 32 << 20  # far from the 64 MiB disk
    # no acknowledged record lost, and the copies are identical block by block
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h1", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == []
    assert_copies_identical(pool, lab, name)


def assert_copies_identical(pool: LabPool, lab: labmod.LabState, name: str) -> None:
    assert pool.copies_identical(name, "h1", "h2") is None


def test_local_disk_failure_is_masked(l2vm, lab: labmod.LabState) -> None:
    pool, name, ip = l2vm
    client = LabClient(lab, ip, name)
    try:
        client.wait_acks(50, 30)
        t = time.time()
        fail_disk(lab, name, "h1")
        pool.wait_for("local copy failed", lambda s: copy_state(s, name, "h1") is CopyState.FAILED, 30)
        client.wait_acks(100, 30, after=t)
    finally:
        acks = client.stop()
    single_connection(client)
    no_guest_io_error(client, lab, name)
    assert "local disk on h1 failed; running on the copy on h2" in protection_of(pool, name)
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h2", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == []
    # the operator replaces the disk: the local copy is rebuilt while the guest runs, then mirrored
    r = subprocess.run([sys.executable, "-m", "ftvm", "vm", "repair-disk", name, "--host", "h1",
                        "--lab-dir", lab.dir], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    client = LabClient(lab, ip, name)
    try:
        pool.wait_for("local copy rebuilt", lambda s: copy_state(s, name, "h1") is CopyState.CURRENT, 60)
        client.wait_acks(30, 30, after=time.time())
    finally:
        client.stop()
    single_connection(client)
    assert protection_of(pool, name) == "Protected"
    assert_copies_identical(pool, lab, name)


def test_a_disk_that_fails_with_the_partner_away_pauses_the_guest_until_it_answers_again(
        l2vm, lab: labmod.LabState) -> None:
    """The partner's copy is outdated (both A-links down) when the local disk starts failing:
    nothing is left to continue on, so the guest waits, paused, and never on the outdated
    copy. The failure is transient (a cable, a controller): once the disk answers again the
    guest's I/O is retried and it continues by itself, its copy never recorded failed and no
    acknowledged record lost (the fault campaign, seed 51 cycle 63, left such a guest paused
    for good)."""
    pool, name, ip = l2vm
    client = LabClient(lab, ip, name)
    try:
        client.wait_acks(30, 30)
        for k in (1, 2):
            labmod.set_a_link(lab, "h1", "h2", k, up=False)
        pool.wait_for("replica outdated", lambda s: copy_state(s, name, "h2") is CopyState.OUTDATED, 30)
        t = time.time()
        fail_disk(lab, name, "h1")
        [paused] = pool.wait_events("the guest paused", lambda e: e.vm == name and e.kind == "io-error"
                                    and e.time > t, 60)
        assert "nothing left to continue on" in paused.message
        assert copy_state(pool.snapshot(), name, "h1") is CopyState.CURRENT  # (the only current copy)
        assert clear_disk_failure(lab, name, "h1")
        [resumed] = pool.wait_events("the guest continues", lambda e: e.vm == name and e.kind == "io-resumed"
                                     and e.time > t, 120)
        client.wait_acks(30, 60, after=resumed.time)
        for k in (1, 2):
            labmod.set_a_link(lab, "h1", "h2", k, up=True)
        pool.wait_for("back in sync", in_sync(name, "h2"), 60)
        client.wait_acks(10, 30, after=time.time())
    finally:
        acks = client.stop()  # (the client may have reconnected: the guest was paused for seconds)
    assert copy_state(pool.snapshot(), name, "h1") is CopyState.CURRENT
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h1", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == []
    assert_copies_identical(pool, lab, name)


def test_one_a_link_down_replication_carries_on(l2vm, lab: labmod.LabState) -> None:
    pool, name, ip = l2vm
    client = LabClient(lab, ip, name)
    try:
        client.wait_acks(50, 30)
        t = time.time()
        labmod.set_a_link(lab, "h1", "h2", 1, up=False)
        client.wait_acks(150, 30, after=t)
        # the VM is still mirrored, but one more failure would cost the replica: said so
        pool.wait_for("the A-link reported down", lambda s: s.a_links_down("h1", "h2")[0] == ["a1-h2"], 10)
        assert protection_of(pool, name) == "Not protected: A-link a1-h2 from h1 to h2 down; replicating over a2-h2"
        assert copy_state(pool.snapshot(), name, "h2") is CopyState.CURRENT
        labmod.set_a_link(lab, "h1", "h2", 1, up=True)
        pool.wait_for("the A-link back", lambda s: not s.a_links_down("h1", "h2")[0], 10)
        assert protection_of(pool, name) == "Protected"
    finally:
        acks = client.stop()
    single_connection(client)
    assert not [e for e in pool.events() if e.vm == name and e.kind == "masked"]
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h2", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == []


def test_host_failure_restarts_on_partner_with_no_acknowledged_write_lost(l2vm, lab: labmod.LabState) -> None:
    pool, name, ip = l2vm
    with CopyObserver(name) as observer:
        client = LabClient(lab, ip, name)
        try:
            client.wait_acks(100, 30)
            t = labmod.fail_host(lab, "h1")
            assert pool.wait_running(name, 60, not_on="h1") == "h2"
            client.wait_acks(50, 60, after=t)
        finally:
            acks = client.stop()
    assert observer.max_copies == 1, observer.overlaps
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h2", Path(lab.dir) / f"{name}.raw"), acks)
    assert len(acks) >= 150 and lost == []  # 100 before the power loss, 50 after
    copies = pool.snapshot().vms[name].copies
    assert copies is not None and copies.copies["h1"].full  # old primary: full resync when back
    labmod.restore_host(lab, "h1")
    pool.wait_for("old primary resynced as the new replica", in_sync(name, "h1"), 90)


def test_a_qemu_crash_restarted_in_place_never_leaves_the_partner_recorded_current(
        l2vm, lab: labmod.LabState) -> None:
    """Regression (found by the fault campaign): the crash policy starts the VM again on h1
    under the same token, on h1's copy alone until a resync. h2's copy must be recorded
    outdated before the guest writes, or a loss of h1 then promotes a copy missing
    acknowledged writes."""
    from ftvm.lab.observer import find_copies
    pool, name, ip = l2vm
    client = LabClient(lab, ip, name)
    try:
        client.wait_acks(50, 30)
        [(pid, _)] = find_copies(name)
        crashed = time.time()
        os.kill(pid, signal.SIGKILL)
        pool.wait_events("the crash restarted here", lambda e: e.vm == name and e.kind == "start"
                         and e.time > crashed and e.host == "h1", 60)
        h2 = pool.snapshot().vms[name].copies.copies["h2"]  # type: ignore[union-attr]
        assert h2.state is not CopyState.CURRENT or h2.since > crashed, h2  # (outdated, or resynced since)
        client.wait_acks(50, 60, after=time.time())
        t = labmod.fail_host(lab, "h1")  # before or after the resync: either way nothing is lost
        assert pool.wait_running(name, 90, not_on="h1") == "h2"
        client.wait_acks(20, 60, after=t)
    finally:
        acks = client.stop()
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h2", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == [], lost[:3]


def test_outdated_replica_is_never_promoted_without_the_flag(l2vm, lab: labmod.LabState) -> None:
    pool, name, ip = l2vm
    for k in (1, 2):
        labmod.set_a_link(lab, "h1", "h2", k, up=False)
    pool.ask(ip, "W written-while-apart")
    pool.wait_for("replica outdated", lambda s: copy_state(s, name, "h2") is CopyState.OUTDATED, 30)
    labmod.fail_host(lab, "h1")
    snap = pool.wait_for("h1 gone", lambda s: "h1" not in s.hosts, 30)
    pool.wait_ticks(["h2"])  # h2 has decided, from a pool without h1
    snap = pool.snapshot()
    assert snap.vms[name].owner is None, "an outdated copy was promoted"
    from ftvm.views import vm_row
    row = vm_row(snap, snap.vms[name])
    assert "copy on h2 is outdated" in row["detail"] and "--accept-data-loss" in row["detail"]
    r = subprocess.run([sys.executable, "-m", "ftvm", "vm", "start", name, "--lab-dir", lab.dir],
                       capture_output=True, text=True)
    assert "cannot start now" in r.stdout and pool.snapshot().vms[name].owner is None
    r = subprocess.run([sys.executable, "-m", "ftvm", "vm", "start", name, "--accept-data-loss", "--host", "h2",
                        "--wait", "--lab-dir", lab.dir], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert pool.wait_running(name, 60) == "h2"
    forced = [e for e in pool.events() if e.vm == name and e.kind == "force"]
    assert forced and "accepting data loss" in forced[0].message


def test_two_level2_vms_share_a_pair_each_with_its_own_copies(l2vm, lab: labmod.LabState, guest_image) -> None:
    pool, first, _ = l2vm
    second = "duo"
    pool.define_ledger_vm(second, 45, Level.COMPONENT, guest_image, host="h1")
    try:
        pool.wait_for("second VM mirrored", in_sync(second, "h2"), 60)
        ip2 = topo.vm_addr(45).split("/")[0]
        pool.wait_answering(ip2, 60)
        labmod.fail_host(lab, "h2")
        pool.ask(ip2, "W while-apart")  # only the second VM writes
        snap = pool.wait_for("both replicas outdated", lambda s: all(
            copy_state(s, v, "h2") is CopyState.OUTDATED for v in (first, second)), 30)
        copies = {v: snap.vms[v].copies for v in (first, second)}
        assert all(c is not None for c in copies.values())
        labmod.restore_host(lab, "h2")
        pool.wait_for("both back in sync", lambda s: in_sync(first, "h2")(s) and in_sync(second, "h2")(s), 60)
        pool.wait_events(f"{first} resynced", lambda e: e.kind == "in-sync" and e.vm == first)
        syncs = pool.wait_events(f"{second} resynced", lambda e: e.kind == "in-sync" and e.vm == second)
        assert syncs
    finally:
        pool.stop_and_remove(second)


def test_stopped_level1_vm_raised_to_level2_keeps_its_data(lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    name, ip = "up2", topo.vm_addr(46).split("/")[0]
    pool.define_ledger_vm(name, 46, Level.RESTART, guest_image, host="h1")
    try:
        pool.wait_running(name, 60)
        pool.wait_answering(ip, 60)
        acks = [pool.ask(ip, f"W kept-{i}") for i in range(5)]
        base = [sys.executable, "-m", "ftvm", "--lab-dir", lab.dir]
        for args in (["vm", "stop", name, "--wait"], ["vm", "set", name, "--level", "2"],
                     ["vm", "start", name, "--wait"]):
            r = subprocess.run(base[:3] + args + ["--lab-dir", lab.dir], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        pool.wait_answering(ip, 60)
        assert pool.ask(ip, "W after").startswith("OK 6 ")  # resumed after the 5 imported records
        pool.wait_for("partner copy synced in full", in_sync(name, "h2"), 60)
        done = pool.wait_events("resync done", lambda e: e.vm == name and e.kind == "in-sync")
        assert "(full)" in done[-1].message
        records = {r.seq: r.payload for r in read_records(pool.copy_as_raw(name, "h2", Path(lab.dir) / "up2.raw"))}
        assert [records[i + 1] for i in range(5)] == [f"kept-{i}".encode() for i in range(5)]
        assert acks[0].startswith("OK 1 ")
    finally:
        pool.stop_and_remove(name)


def _copy_server_pid(vm: str, program: str) -> int:
    """h2's copy is qcow2: nbdkit faces the network, a qemu-storage-daemon writes the file."""
    mark = f"name={vm}-d0" if program == "qemu-storage-daemon" else f"/export-tls/{vm}/"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(program.encode()) and mark.encode() in cmd:
                return int(entry.name)
    raise AssertionError(f"no {program} for {vm}")


@pytest.mark.parametrize("program", ["nbdkit", "qemu-storage-daemon"])
def test_hung_partner_daemon_is_detected_and_masked(l2vm, lab: labmod.LabState, program: str) -> None:
    """A partner whose server hangs (SIGSTOP) still accepts TCP: the owner's probe wants the
    NBD greeting. nbdkit still greets when the daemon behind it hangs: the partner's agent
    probes that one and ends both. Either way the replica is recorded outdated and the guest
    carries on."""
    pool, name, ip = l2vm
    pid = _copy_server_pid(name, program)
    client = LabClient(lab, ip, name)
    try:
        client.wait_acks(50, 30)
        t = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            pool.wait_for("replica outdated", lambda s: copy_state(s, name, "h2") is CopyState.OUTDATED, 30)
            client.wait_acks(50, 30, after=t)
        finally:
            with suppress(ProcessLookupError):  # (a hung daemon behind nbdkit is killed)
                os.kill(pid, signal.SIGCONT)
        if program == "qemu-storage-daemon":
            pool.wait_events("the partner's agent ended the hung servers", lambda e: e.vm == name
                             and e.kind == "error" and "stopped answering" in e.message and e.time > t, 30)
    finally:
        acks = client.stop()
    # the guest waits for the hung write until the probe gives up on the partner (~2 s), so the
    # client may time out and reconnect; what must not happen is an I/O error in the guest
    no_guest_io_error(client, lab, name)
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h1", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == []


def test_live_migration_keeps_replication(l2vm, lab: labmod.LabState) -> None:
    """Moved live to its partner and back: one client connection, no I/O error, nothing
    lost; each time the old host's copy becomes the replica and is resynced from the new
    host's bitmap (a few blocks, not the disk), and the copies end identical."""
    from ftvm import ops
    from ftvm.views import runs_on
    pool, name, ip = l2vm
    client = LabClient(lab, ip, name, 0.01, reply_timeout=60)
    try:
        client.wait_acks(50, 30)
        for target, old in (("h2", "h1"), ("h1", "h2")):
            t0 = time.time()
            pool.run(lambda s, t=target: ops.migrate(s, name, t))
            pool.wait_for(f"running on {target}", lambda s, t=target: runs_on(s, name, t), 60)
            pool.wait_for(f"{old}'s copy resynced as the replica", in_sync(name, old), 60)
            assert protection_of(pool, name) == "Protected"
            client.wait_acks(30, 30, after=time.time())
            syncs = pool.wait_events("resync done", lambda e, t0=t0: e.vm == name and e.kind == "in-sync"
                                     and e.time > t0)
            assert "(full)" not in syncs[-1].message, syncs
            copied = int(syncs[-1].message.split("resync copied ")[1].split()[0])
            assert copied < 8 << 20, syncs[-1].message  # what was written since the move, not 64 MiB
    finally:
        acks = client.stop()
    single_connection(client)
    no_guest_io_error(client, lab, name)
    events = [e for e in pool.events() if e.vm == name]
    assert sum(1 for e in events if e.kind == "migrate" and "handed over" in e.message) == 2
    _, lost = check_acked_on_disk(pool.copy_as_raw(name, "h1", Path(lab.dir) / f"{name}.raw"), acks)
    assert lost == []
    assert_copies_identical(pool, lab, name)


def test_online_level_changes_keep_the_guest_running(lab: labmod.LabState, guest_image) -> None:
    """A running VM goes 1 -> 2 -> 1 -> 2 -> 0 with `vm set --level --wait`: no restart (one
    QEMU process, one client connection), no I/O error, nothing acknowledged lost; at level 2
    it is Protected only once the partner's copy is in sync and the copies are identical;
    lowered, the partner stops serving its copy; lowered to 0, its copy stays write-through."""
    from ftvm.lab.client import read_log
    from ftvm.qemu.writethrough import is_write_through
    pool = LabPool(lab)
    name, index = "lvl", 47
    ip = topo.vm_addr(index).split("/")[0]
    spec = pool.define_ledger_vm(name, index, Level.RESTART, guest_image, host="h1")
    shared = spec.disks[0].path
    base = [sys.executable, "-m", "ftvm", "--lab-dir", lab.dir]

    def set_level(level: int) -> None:
        r = subprocess.run(base[:3] + ["vm", "set", name, "--level", str(level), "--wait", "--timeout", "120",
                                       "--lab-dir", lab.dir], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

    client = None
    try:
        pool.wait_running(name, 60)
        pool.wait_answering(ip, 60)
        pid = pool.snapshot().vms[name].status.detail  # "pid N, tcg"
        client = LabClient(lab, ip, name, 0.01, reply_timeout=60)
        client.wait_acks(30, 30)
        for level in (2, 1, 2, 0):
            set_level(level)
            snap = pool.snapshot()
            view = snap.vms[name]
            assert int(view.spec.level) == level and view.level_change is None
            if level == 2:
                assert protection_of(pool, name) == "Protected"
                assert copy_state(snap, name, "h2") is CopyState.CURRENT
                assert_copies_identical(pool, lab, name)
            else:
                assert view.copies is None
                pool.wait_for("partner stopped serving", lambda s: not s.vms[name].exports, 30)
            pool.ask(ip, "F 1024")  # 1 MiB more between changes
            client.wait_acks(20, 30, after=time.time())
        assert pool.snapshot().vms[name].status.detail == pid  # the same QEMU all along
        final = Path(pool.snapshot().vms[name].spec.disks[0].path)  # level 0: h1's local copy
        assert final == Path(lab.host_dir("h1")) / "local" / name / "disk0.img"
        # lowered to 0, the guest still runs on its copy's node that skips flushes: the
        # copy's synchronous-write attribute stays watched while this QEMU runs
        t = time.time()
        subprocess.run(["chattr", "-S", str(final)], check=True)
        pool.wait_events("attribute restored", lambda e: e.vm == name and e.kind == "warning"
                         and e.time > t and str(final) in e.message, 15)
        assert is_write_through(str(final))
        acks = client.stop()
        _, lost = check_acked_on_disk(final, acks)
        assert lost == [] and len(acks) > 100
        assert Path(shared).exists()
    finally:
        if client is not None:
            client.stop()
        pool.stop_and_remove(name)
    _, other = read_log(client.log)
    assert [e["kind"] for e in other] == ["connect"], other
    no_guest_io_error(client, lab, name)
    events = [e.message for e in pool.events() if e.vm == name and e.kind == "level"]
    assert len(events) == 4 and all("while running" in m for m in events), events


def _block_nodes(lab: labmod.LabState, host: str, vm: str) -> dict[str, dict]:
    import asyncio

    from qemu.qmp import QMPClient

    async def query() -> list[dict]:
        qmp = QMPClient("test")
        await qmp.connect(str(lab.host_dir(host) / "state" / "vms" / vm / "qmp-debug.sock"))
        try:
            return await qmp.execute("query-named-block-nodes", {"flat": True})  # type: ignore[return-value]
        finally:
            await qmp.disconnect()
    return {n["node-name"]: n for n in asyncio.run(query())}


def test_copies_are_write_through_and_kept_so(l2vm, lab: labmod.LabState) -> None:
    """Both copies carry the synchronous-write attribute, so the primary's node on its copy
    and the partner's daemon skip flushes; an attribute cleared behind the agent's back is
    set again within seconds, with an event saying so."""
    import json

    from ftvm.qemu.writethrough import is_write_through
    pool, name, ip = l2vm
    local, _ = pool.copy_path(name, "h1")
    remote, _ = pool.copy_path(name, "h2")
    assert is_write_through(str(local)) and is_write_through(str(remote))
    nodes = _block_nodes(lab, "h1", name)
    quorum = next(n for n in nodes.values() if n["drv"] == "quorum")
    on_copy = [n for n in nodes.values() if n["drv"] == "file" and n["file"] == str(local)]
    assert on_copy and all(n["cache"]["no-flush"] for n in on_copy), on_copy
    assert quorum["node-name"].startswith("d0-q")
    qsd = (Path("/proc") / str(_copy_server_pid(name, "qemu-storage-daemon")) / "cmdline").read_bytes().split(b"\0")
    files = [json.loads(a) for a in qsd if a.startswith(b"{") and b'"driver": "file"' in a]
    assert [f["cache"]["no-flush"] for f in files] == [True], files
    t = time.time()
    subprocess.run(["chattr", "-S", str(local)], check=True)
    pool.wait_events("attribute restored", lambda e: e.vm == name and e.kind == "warning"
                     and e.time > t and str(local) in e.message, 15)
    assert is_write_through(str(local))
    # writes that skip the flushes land on both copies alike, synchronous or through the page cache
    before = pool.disk_stats(name)
    pool.bulk_write(ip, 8, 64)
    after = pool.disk_stats(name)
    pool.bulk_write(ip, 8, 1024, buffered=True)
    assert_copies_identical(pool, lab, name)
    # each 64 KiB O_DSYNC write reached QEMU as a write and a flush (what the bench times)
    assert after["wr_operations"] - before["wr_operations"] >= 128
    assert after["flush_operations"] - before["flush_operations"] >= 128


def test_a_vm_defined_again_under_a_removed_name_never_gets_the_old_images(
        lab: labmod.LabState, guest_image) -> None:
    """`vm remove` keeps the copies; a new VM of the same name is another VM: each host sets
    the old copy aside (renamed, with an event) and the new VM starts on fresh disks."""
    pool = LabPool(lab)
    name, index = "again", 72
    ip = topo.vm_addr(index).split("/")[0]
    pool.define_ledger_vm(name, index, Level.COMPONENT, guest_image, host="h1")
    try:
        pool.wait_for("protected", lambda s: protection(s, s.vms[name]).protected, 120)
        pool.wait_answering(ip, 60)
        for i in range(5):
            assert pool.ask(ip, f"W old-{i}").startswith("OK")
        assert pool.ask(ip, "S") == "SEQ 5"
    finally:
        pool.stop_and_remove(name)
    t = time.time()
    pool.define_ledger_vm(name, index, Level.COMPONENT, guest_image, host="h1")
    try:
        pool.wait_for("protected again", lambda s: protection(s, s.vms[name]).protected, 120)
        pool.wait_answering(ip, 60)
        assert pool.ask(ip, "S") == "SEQ 0"  # a fresh disk, not the removed VM's ledger
        for host in ("h1", "h2"):
            pool.wait_events(f"set aside on {host}", lambda e, h=host: e.vm == name and e.host == h
                             and e.time > t and "set aside" in e.message, 30)
            aside = [p for p in (lab.host_dir(host) / "local").iterdir() if p.name.startswith(f"{name}.removed-")]
            assert len(aside) == 1 and any(aside[0].glob("disk0.*")), aside
        assert_copies_identical(pool, lab, name)
    finally:
        pool.stop_and_remove(name)
