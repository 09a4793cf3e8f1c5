"""Level 1 acceptance tests in a real lab: namespaces, etcd, agents, QEMU, the ledger guest.

"Never two copies" is checked by an outside witness (CopyObserver samples /proc
every 20 ms for QEMU processes of the VM) and, for the partition, by the order
of the fence and start events, whose times come from the two hosts' agents.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftvm.core.model import Level
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.observer import CopyObserver, find_copies
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, level1_failover

pytestmark = pytest.mark.lab


def ftvm(state: labmod.LabState, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ftvm", *args, "--lab-dir", state.dir],
                          capture_output=True, text=True, timeout=120)


def test_vm_answers_client_and_is_protected(lab: labmod.LabState, guest_image) -> None:
    disk = lab.shared_dir / "web1.img"
    disk.write_bytes(b"")
    with open(disk, "r+b") as f:
        f.truncate(64 << 20)
    r = ftvm(lab, "vm", "add", "web1", "--level", "1", "--demo-guest", "--disk", str(disk),
             "--mac", "52:54:00:77:01:01", "--ip", "10.77.0.111/24", "--start", "--wait", "-o", "json")
    assert r.returncode == 0, r.stderr
    pool = LabPool(lab)
    try:
        pool.wait_answering("10.77.0.111", 60)
        r = ftvm(lab, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        [row] = [v for v in json.loads(r.stdout)["vms"] if v["name"] == "web1"]
        assert (row["level"], row["state"], row["protected"]) == (1, "running", True)
        assert row["protection"] == "Protected"
        r = ftvm(lab, "status")
        assert "web1" in r.stdout and "Protected" in r.stdout
    finally:
        pool.stop_and_remove("web1")


def test_vm_stop_asks_the_guest_first_and_force_powers_off_at_once(lab: labmod.LabState, guest_image) -> None:
    """`vm stop` presses the ACPI power button and the guest powers itself off; `--force`
    powers off at once; both are said in the events."""
    pool = LabPool(lab)
    name, index = "acpi1", 71
    pool.define_ledger_vm(name, index, Level.RESTART, guest_image, host="h1")
    ip = topo.vm_addr(index).split("/")[0]
    serial = Path(lab.host_dir("h1")) / "state" / "vms" / name / "serial.log"
    try:
        pool.wait_answering(ip, 60)
        t = time.time()
        r = ftvm(lab, "vm", "stop", name, "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "power button, powering off" in serial.read_text(errors="replace")
        pool.wait_events("guest powered off", lambda e: e.vm == name and e.time > t
                         and "the guest powered off after" in e.message, 15)
        r = ftvm(lab, "vm", "start", name, "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        pool.wait_answering(ip, 60)
        t = time.time()
        r = ftvm(lab, "vm", "stop", name, "--force", "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "power button" not in serial.read_text(errors="replace")  # a new QEMU, a new log
        pool.wait_events("powered off at once", lambda e: e.vm == name and e.time > t
                         and "powered off at once" in e.message, 15)
        r = ftvm(lab, "vm", "start", name, "--wait")
        assert r.returncode == 0 and not pool.snapshot().vms[name].spec.stop_force  # a start clears it
    finally:
        pool.stop_and_remove(name)


def test_host_failure_restarts_vm_elsewhere_without_losing_acknowledged_records(
        lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    try:
        result = level1_failover(pool, guest_image, name="fo", index=2)
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 30)
    try:
        assert result.new_host != result.failed_host
        assert result.acknowledged >= 60
        assert result.lost == 0, result
        assert result.max_copies == 1 and result.copy_samples > 50
        # detection cannot beat the lease: the survivor waited for it to expire
        assert result.detection_s >= result.lease_ttl_s - 1.5
        assert any("claim" in e and result.new_host in e for e in result.events)
    finally:
        pool.stop_and_remove("fo")


def test_host_cut_off_from_quorum_stops_its_vm_before_the_other_starts_it(
        lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    name, ip = "part", topo.vm_addr(3).split("/")[0]
    spec = pool.define_ledger_vm(name, 3, Level.RESTART, guest_image, host="h1")
    try:
        assert pool.wait_running(name, 60) == "h1"
        pool.wait_answering(ip, 60)
        with CopyObserver(name) as observer:
            client = LabClient(lab, ip, name)
            try:
                client.wait_acks(30, 30)
                cut_at = time.time()
                labmod.partition(lab, "h1", "quorum")
                try:
                    assert pool.wait_running(name, 60, not_on="h1") == "h2"
                    client.wait_acks(20, 60, after=cut_at)
                finally:
                    labmod.heal(lab, "h1", "quorum")
            finally:
                acks = client.stop()
        # h1 rejoins and publishes the events it recorded while cut off
        labmod.wait_for_hosts(lab, ["h1"], 30)
        deadline = time.monotonic() + 15
        while True:
            events = [e for e in pool.events() if e.vm == name and e.time > cut_at]
            fenced = [e for e in events if e.host == "h1" and e.kind == "fence"]
            started = [e for e in events if e.host == "h2" and e.kind == "start"]
            if (fenced and started) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert fenced and started, events
        assert fenced[0].time < started[0].time, "h2 started the VM before h1 had stopped it"
        assert observer.max_copies == 1, observer.overlaps
        assert observer.hosts_seen == ["ftvm-h1", "ftvm-h2"]
        _, lost = check_acked_on_disk(Path(spec.disks[0].path), acks)
        assert lost == []
        # h1, back in the pool, leaves the VM where it is
        pool.wait_ticks(["h1", "h2"])
        view = pool.snapshot().vms[name]
        assert view.owner is not None and view.owner.host == "h2"
        assert [ns for _, ns in find_copies(name)] == ["ftvm-h2"]
    finally:
        pool.stop_and_remove(name)


# --- bad input: a one-line error naming the problem, a stable exit code, nothing changed ----

def pool_state(pool: LabPool) -> dict[str, object]:
    snap = pool.snapshot()
    return {"vms": {n: v.spec.to_json() for n, v in snap.vms.items()}, "hosts": sorted(snap.hosts)}


@pytest.mark.parametrize("args, code, words", [
    (["vm", "show", "nope"], 3, "unknown VM 'nope'"),
    (["vm", "start", "nope"], 3, "unknown VM 'nope'"),
    (["vm", "remove", "nope"], 3, "unknown VM 'nope'"),
    (["vm", "add", "bad", "--mac", "52:54:00:zz:00:01", "--disk", "{shared}/x.img"], 2, "malformed MAC"),
    (["vm", "add", "bad", "--disk", "{shared}/missing.img"], 2, "missing.img does not exist"),
    (["vm", "add", "bad", "--memory", "999999", "--disk", "{shared}/x.img"], 2, "larger than any host"),
    (["vm", "add", "bad", "--disk", "{dir}/x.img"], 2, "shared storage"),
    (["vm", "add", "Bad_Name", "--disk", "{shared}/x.img"], 2, "invalid VM name"),
    (["lab", "up", "--lease-ttl", "1"], 2, "timing invariant"),
    (["lab", "fail-host", "h7"], 2, "unknown host 'h7'"),
])
def test_bad_input_is_refused_and_changes_nothing(lab: labmod.LabState, args: list[str], code: int,
                                                  words: str) -> None:
    (lab.shared_dir / "x.img").write_bytes(b"\0" * 4096)
    (Path(lab.dir) / "x.img").write_bytes(b"\0" * 4096)
    pool = LabPool(lab)
    before = pool_state(pool)
    namespaces = sorted(labmod.existing_namespaces())
    r = ftvm(lab, *[a.format(shared=lab.shared_dir, dir=lab.dir) for a in args])
    assert r.returncode == code, (r.stdout, r.stderr)
    assert words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert pool_state(pool) == before
    assert sorted(labmod.existing_namespaces()) == namespaces
    assert not labmod.load_state(Path(lab.dir)).failed


def test_agent_refuses_config_breaking_timing_invariant(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('name = "h1"\npool = "lab"\netcd = ["http://127.0.0.1:9"]\nstate_dir = "/tmp/x"\n'
                   'bridge = "br0"\nmemory_mib = 1024\nvcpus = 2\n[timing]\nlease_ttl = 2\n')
    r = subprocess.run([sys.executable, "-m", "ftvm", "agent", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "timing invariant broken" in r.stderr and "keepalive" in r.stderr
