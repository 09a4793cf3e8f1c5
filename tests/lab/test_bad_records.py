"""Garbage in the store: one VM's spec, copies, export and owner values overwritten with
what etcdctl would let anyone write. The other VM keeps running and answering, every agent
stays up, the bad VM keeps running where it is, its status gives the reason, and it thaws
when the value is put back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftvm.core.model import Level
from ftvm.core.protection import protection
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabPool
from ftvm.views import row_of

pytestmark = pytest.mark.lab


def test_garbage_in_one_vms_keys_freezes_only_that_vm(lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    pool.define_ledger_vm("gk1", 62, Level.RESTART, guest_image, host="h2")
    pool.define_ledger_vm("gk2", 63, Level.COMPONENT, guest_image, host="h1")
    ok_ip, bad_ip = topo.vm_addr(62).split("/")[0], topo.vm_addr(63).split("/")[0]
    try:
        pool.wait_answering(ok_ip, 60)
        pool.wait_answering(bad_ip, 60)
        pool.wait_for("gk2 protected", lambda s: protection(s, s.vms["gk2"]).protected, 120)
        token = pool.snapshot().vms["gk2"].owner.token  # type: ignore[union-attr]
        tried = 0
        for part, garbage in (("copies", b'{"gen": "x"}'), ("export/h2", b"\xff\xfe"), ("owner", b"[1, 2"),
                              ("spec", b"{"), ("spec", b'{"v": 99, "name": "gk2"}')):
            key = f"/ftvm/{labmod.POOL}/state/vms/gk2/{part}"
            kv = pool.run(lambda s, k=key: s.etcd.get(k))
            assert kv is not None, key
            # the owner key keeps its lease (a put without it would outlive the host)
            pool.run(lambda s, k=key, v=garbage, le=kv.lease: s.etcd.put(k, v, le))
            tried += 1
            snap = pool.wait_for(f"gk2 frozen by its {part}", lambda s: "gk2" in s.frozen, 30)
            row = row_of(snap, "gk2")
            assert row is not None and row["protection"].startswith("Not protected: record") and \
                part.split("/")[0] in row["protection"], row
            r = subprocess.run([sys.executable, "-m", "ftvm", "status", "--lab-dir", lab.dir],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "unreadable" in r.stdout, r.stdout + r.stderr
            pool.wait_ticks(["h1", "h2"])  # the agents have seen it and decided
            assert pool.ask(ok_ip, "W still-here").startswith("OK")  # the other VM answers
            assert pool.ask(bad_ip, "P").startswith("PONG")  # the frozen one runs on where it was
            snap = pool.snapshot()
            assert set(snap.hosts) == {"h1", "h2"} and snap.vms["gk1"].owner is not None
            pool.run(lambda s, k=key, v=kv.value, le=kv.lease: s.etcd.put(k, v, le))  # put back
            pool.wait_for("gk2 thawed and protected", lambda s: "gk2" not in s.frozen
                          and protection(s, s.vms["gk2"]).protected, 60)
        view = pool.snapshot().vms["gk2"]
        assert view.owner is not None and (view.owner.host, view.owner.token) == ("h1", token)
        events = [e for e in pool.events() if e.kind == "bad-record"]
        assert len(events) >= tried, events
        assert not [e for e in pool.events() if e.kind == "agent-error"]
    finally:
        pool.stop_and_remove("gk1")
        pool.stop_and_remove("gk2")
