"""The agents' REST API and metrics in a lab pool, from the management namespace."""

from __future__ import annotations

import time

import httpx
import pytest

from ftvm.core.model import BootSpec, DiskSpec, Level, NicSpec, VmSpec
from ftvm.guest.build import make_ledger_disk
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabPool

pytestmark = pytest.mark.lab


def _follow(http: httpx.Client, job: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = http.get(f"/api/v1/jobs/{job['id']}").json()
    return job


def test_api_starts_and_stops_a_vm_and_metrics_follow(lab: labmod.LabState, guest_image) -> None:
    token = lab.api_token_file.read_text().strip()
    assert httpx.get(lab.api_url("h2") + "/api/v1/status").status_code == 401
    disk = lab.shared_dir / "apivm.img"
    make_ledger_disk(disk)
    nic = NicSpec("52:54:00:77:00:9a", topo.vm_addr(90))
    spec = VmSpec("apivm", Level.RESTART, 256, 1, (DiskSpec(str(disk)),), (nic,),
                  BootSpec(str(guest_image.kernel), str(guest_image.initrd), guest_image.append),
                  preferred_host="h1")
    with httpx.Client(base_url=lab.api_url("h2"), headers={"Authorization": f"Bearer {token}"},
                      timeout=10) as http:
        status = http.get("/api/v1/status").json()
        assert sorted(h["name"] for h in status["hosts"]) == sorted(lab.hosts)
        r = http.post("/api/v1/vms", json=spec.to_json())
        assert r.status_code == 202, r.text
        assert _follow(http, r.json(), 10)["state"] == "succeeded"
        r = http.post("/api/v1/vms/apivm/start")
        assert r.status_code == 202
        job = _follow(http, r.json(), 60)
        assert job["state"] == "succeeded" and job["progress"] == "running on h1", job
        LabPool(lab).wait_answering(topo.vm_addr(90).split("/")[0], 60)
        text = http.get("/metrics").text
        assert 'ftvm_vm_running{vm="apivm"} 1' in text
        assert 'ftvm_vm_protected{vm="apivm"} 1' in text  # level 1 on shared storage, h2 can take it
        assert 'ftvm_host_up{host="h1"} 1' in text and 'ftvm_quorum_reachable{host="h2"} 1' in text
        r = http.delete("/api/v1/vms/apivm")
        assert r.status_code == 409 and "not stopped" in r.json()["error"]
        r = http.post("/api/v1/vms/apivm/migrate", json={"to": "h2"})
        assert r.status_code == 202, r.text
        job = _follow(http, r.json(), 60)
        assert job["state"] == "succeeded" and job["progress"] == "apivm on h2", job
        assert http.post("/api/v1/vms/apivm/migrate", json={"to": "h2"}).status_code == 409
        assert 'ftvm_migrations_total{host="h2",vm="apivm"} 1' in http.get("/metrics").text
        job = _follow(http, http.post("/api/v1/vms/apivm/stop").json(), 60)
        assert job["state"] == "succeeded" and job["progress"] == "stopped"
        assert http.delete("/api/v1/vms/apivm").status_code == 202
        assert "apivm" not in [v["name"] for v in http.get("/api/v1/vms").json()]
