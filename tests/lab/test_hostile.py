"""Hostile peers against a lab pool: forged checkpoint-stream messages, an NBD client and
an etcd client without credentials, from the client namespace and from another host.
Each is refused, every agent stays up, and the level 3 replica is still exact: the VM
switches over to it afterwards with its connection and every acknowledged record."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import pytest

from ftvm.core.model import Level
from ftvm.core.protection import protection
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, l3_protected, sequence_breaks

pytestmark = pytest.mark.lab


def attack(ns: str | None, *args: str) -> dict:
    cmd = [sys.executable, "-m", "ftvm.lab.hostile", *args]
    proc = subprocess.run((["ip", "netns", "exec", ns] if ns else []) + cmd, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_hostile_peers_are_refused_and_change_nothing(lab: labmod.LabState, guest_image) -> None:
    from ftvm import ops
    from ftvm.views import runs_on
    pool = LabPool(lab)
    spec3 = pool.define_ledger_vm("hx3", 60, Level.SYSTEM, guest_image, host="h1")
    pool.define_ledger_vm("hx2", 61, Level.COMPONENT, guest_image, host="h1")
    ip = topo.vm_addr(60).split("/")[0]
    client = None
    try:
        pool.wait_for("hx3 protected", l3_protected("hx3"), 120)
        pool.wait_for("hx2 protected", lambda s: protection(s, s.vms["hx2"]).protected, 120)
        pool.wait_answering(ip, 60)
        client = LabClient(lab, ip, "hx3", 0.02, reply_timeout=60)
        client.wait_acks(30, 30)
        partner = topo.replication_addr("h2")
        sizes = ",".join(str(s) for s in [spec3.memory_mib << 20] + [d.size for d in spec3.disks])
        l3 = ["l3", partner, "7410"]
        h1 = topo.host_ns("h1")
        # from the client namespace: the replication network is not routed there at all
        r = attack(topo.CLIENT_NS, *l3, "hello", "hx3", sizes)
        assert r["reply"] in ("unreachable", "refused") and r["closed"], r
        # from the owner's host but from its LAN address: not the owner's replication address
        r = attack(h1, *l3, "hello", "hx3", sizes, topo.host_lan_addr("h1").split("/")[0])
        assert r["reply"] == "refused" and "replication address" in r["why"] and r["closed"], r
        # from the owner's own replication address, while its session is live: refused
        r = attack(h1, *l3, "hello", "hx3", sizes)
        assert r["reply"] == "refused" and "live" in r["why"], r
        # sizes that would shrink the replica, a VM this host is not the partner of
        r = attack(h1, *l3, "hello", "hx3", "4096,4096")
        assert r["reply"] == "refused", r
        r = attack(h1, *l3, "hello", "nosuchvm", sizes)
        assert r["reply"] == "refused" and "not the partner" in r["why"], r
        # no handshake: a checkpoint straight away; a 1 GiB HELLO
        for how in ("checkpoint-first", "huge-hello"):
            for ns in (topo.CLIENT_NS, h1):
                assert attack(ns, *l3, how, "hx3", sizes)["closed"], (how, ns)
        # the level 2 partner's NBD export, without the key: no export is opened in the clear
        snap = pool.snapshot()
        [export] = [e for e in snap.vms["hx2"].exports if e.host == "h2"]
        r = attack(h1, "nbd", export.addr, str(export.port))
        assert r["greeting"] == "NBDMAGIC" and r["error"], r
        assert attack(topo.CLIENT_NS, "nbd", export.addr, str(export.port))["error"]
        # etcd without a client certificate (from the management side, which reaches it)
        r = attack(None, "etcd", lab.etcd_endpoint, str(lab.pki_dir / "ca.crt"))
        assert not r["answered"], r
        # the API: plain HTTP gets no HTTP answer; no token is 401, the read-only token cannot delete
        read_token = lab.api_read_token_file.read_text().strip()
        r = attack(None, "api", lab.api_url("h2"), str(lab.pki_dir / "ca.crt"), read_token)
        assert not r["plain_reply"].startswith("HTTP/1.1 2"), r
        assert (r["no_token"], r["read_token_delete"]) == (401, 403), r
        # the copies and the level 3 replica are readable by their owner only (root or QEMU's user)
        private = [pool.copy_path(vm, h)[0] for vm in ("hx2", "hx3") for h in ("h1", "h2")]
        for path in private:
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (path, oct(st.st_mode))
        # nothing changed: both agents up, both VMs protected, the client never noticed
        snap = pool.snapshot()
        assert set(snap.hosts) == {"h1", "h2"}
        assert l3_protected("hx3")(snap) and protection(snap, snap.vms["hx2"]).protected
        client.wait_acks(30, 30, after=time.time())
        # the replica is exact: switched over to it, the guest carries on from it
        pool.run(lambda s: ops.migrate(s, "hx3", "h2"))
        pool.wait_for("on h2", lambda s: runs_on(s, "hx3", "h2"), 60)
        client.wait_acks(20, 30, after=time.time())
        acks = client.stop()
        assert [e.get("kind") for e in client.other_events()] == ["connect"], client.other_events()
        assert sequence_breaks(acks) == (0, 0)
        raw, _ = pool.copy_path("hx3", "h2")
        assert check_acked_on_disk(raw, acks)[1] == []
        events = [e for e in pool.events() if e.vm in ("hx3", "hx2")]
        assert not [e for e in events if e.kind in ("takeover", "fence", "agent-error")], events
    finally:
        if client is not None:
            client.stop()
        pool.stop_and_remove("hx3")
        pool.stop_and_remove("hx2")
