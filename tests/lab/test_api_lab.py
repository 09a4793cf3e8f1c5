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
    reader = lab.api_read_token_file.read_text().strip()
    tls = lab.https()
    assert httpx.get(lab.api_url("h2") + "/api/v1/status", verify=tls).status_code == 401
    with pytest.raises(httpx.HTTPError):  # https only: a plain-HTTP request gets no answer
        httpx.get(lab.api_url("h2").replace("https://", "http://") + "/api/v1/status",
                  headers={"Authorization": f"Bearer {token}"}, timeout=5)
    with httpx.Client(base_url=lab.api_url("h2"), headers={"Authorization": f"Bearer {reader}"},
                      verify=tls, timeout=10) as ro:  # the read-only token reads, never writes
        assert ro.get("/metrics").status_code == 200 and ro.get("/api/v1/status").status_code == 200
        assert ro.post("/api/v1/vms", json={}).status_code == 403
    disk = lab.shared_dir / "apivm.img"
    make_ledger_disk(disk)
    nic = NicSpec("52:54:00:77:00:9a", topo.vm_addr(90))
    spec = VmSpec("apivm", Level.RESTART, 256, 1, (DiskSpec(str(disk)),), (nic,),
                  BootSpec(str(guest_image.kernel), str(guest_image.initrd), guest_image.append),
                  preferred_host="h1")
    with httpx.Client(base_url=lab.api_url("h2"), headers={"Authorization": f"Bearer {token}"},
                      verify=tls, timeout=10) as http:
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


def test_the_cli_works_through_the_api(lab: labmod.LabState, guest_image, tmp_path) -> None:
    """With --api and a token the CLI needs no access to etcd at all (a dead etcd URL is
    given): it adds, starts, shows and stops a VM through the agents; a wrong token is
    refused with nothing changed; a first URL that does not answer is skipped."""
    import os
    import subprocess
    import sys
    disk = lab.shared_dir / "clivm.img"
    make_ledger_disk(disk)
    good = tmp_path / "token"
    good.write_text(lab.api_token_file.read_text())
    bad = tmp_path / "bad"
    bad.write_text("not-the-token\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTVM_")}

    def cli(*args: str, token=good, api: str | None = None) -> subprocess.CompletedProcess[str]:
        api = api or f"http://127.0.0.1:9,{lab.api_url('h2')}"  # the first never answers
        return subprocess.run([sys.executable, "-m", "ftvm", *args, "--api", api, "--api-token-file", str(token),
                               "--ca", str(lab.pki_dir / "ca.crt"), "--etcd", "http://127.0.0.1:9"],
                              capture_output=True, text=True, env=env,
                              timeout=120)

    r = cli("vm", "add", "clivm", "--level", "1", "--memory", "256", "--disk", str(disk), "--demo-guest",
            "--ip", topo.vm_addr(91), "--host", "h1", token=bad)
    assert r.returncode == 2 and "token" in r.stderr, r.stderr
    assert "clivm" not in LabPool(lab).snapshot().vms
    r = cli("vm", "add", "clivm", "--level", "1", "--memory", "256", "--disk", str(disk), "--demo-guest",
            "--ip", topo.vm_addr(91), "--host", "h1")
    assert r.returncode == 0, r.stderr
    try:
        r = cli("vm", "start", "clivm", "--wait", "--timeout", "60")
        assert r.returncode == 0 and "running on h1" in r.stdout, r.stdout + r.stderr
        r = cli("status")
        assert r.returncode == 0 and "via API" in r.stdout and "clivm" in r.stdout, r.stdout
        r = cli("vm", "show", "clivm", "-o", "json")
        import json
        assert json.loads(r.stdout)["host"] == "h1"
        r = cli("vm", "migrate", "clivm", "--to", "h2", "--wait", "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        assert LabPool(lab).snapshot().vms["clivm"].owner.host == "h2"  # type: ignore[union-attr]
        r = cli("vm", "stop", "clivm", "--wait", "--timeout", "60")
        assert r.returncode == 0, r.stderr
        r = cli("vm", "remove", "clivm")
        assert r.returncode == 0, r.stderr
        assert "clivm" not in LabPool(lab).snapshot().vms
        r = cli("vm", "show", "clivm")
        assert r.returncode == 3 and "unknown VM" in r.stderr  # the API's NOT_FOUND, the CLI's exit code
    finally:
        pool = LabPool(lab)
        if "clivm" in pool.snapshot().vms:
            pool.stop_and_remove("clivm")
