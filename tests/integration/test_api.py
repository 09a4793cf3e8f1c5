"""The REST API and /metrics against a real etcd: authentication, reads, jobs, errors."""

from __future__ import annotations

import asyncio
import itertools
import socket
from dataclasses import replace

import httpx
import pytest

from ftvm.api.metrics import AgentCounters, AgentHealth
from ftvm.api.server import ApiContext, make_app, serve
from ftvm.core.model import Desired, DiskSpec, HostInfo, Level, NicSpec, VmSpec
from ftvm.store.etcd import EtcdClient
from ftvm.store.pool import PoolStore

TOKEN = "test-token-0123456789abcdef"
_pools = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def api(etcd_url: str):
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        store = PoolStore(client, f"api{next(_pools)}")
        for h in ("h1", "h2"):
            lease, _ = await client.lease_grant(30)
            assert await store.register_host(HostInfo(h, 4096, 4, ("/s",), image_roots=("/etc",)), lease)
        counters = AgentCounters(failovers={"web": 2})
        ctx = ApiContext(store, "p", [etcd_url], TOKEN, store.snapshot,
                         lambda: AgentHealth("h1", True, 5.0, 3.2), counters)
        port = _free_port()
        runner = await serve(make_app(ctx), "127.0.0.1", port, None)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                yield http, store
        finally:
            await runner.cleanup()


def spec_json(name: str = "web", **kw) -> dict:
    spec = VmSpec(name, Level.UNPROTECTED, 256, 1, (), (NicSpec("52:54:00:00:10:01"),))
    d = spec.to_json() | {"boot": {"kernel": "/etc/hostname", "initrd": None, "append": ""}}
    return d | kw


async def test_without_the_token_every_request_is_401_and_changes_nothing(api) -> None:
    http, store = api
    for token in (None, "Bearer wrong-token-0123456789", "Basic " + TOKEN):
        headers = {"Authorization": token} if token else {}
        r = await http.post("/api/v1/vms", json=spec_json(), headers=headers | {"Authorization": token or ""})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        for path in ("/api/v1/status", "/metrics", "/api/v1/openapi.json"):
            assert (await http.get(path, headers={"Authorization": token or ""})).status_code == 401
    assert (await store.snapshot()).vms == {}


async def test_define_follow_the_job_read_patch_and_remove(api) -> None:
    http, store = api
    r = await http.post("/api/v1/vms", json=spec_json())
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    for _ in range(50):
        job = (await http.get(f"/api/v1/jobs/{job['id']}")).json()
        if job["state"] != "running":
            break
        await asyncio.sleep(0.05)
    assert job["state"] == "succeeded" and job["vm"] == "web"
    vms = (await http.get("/api/v1/vms")).json()
    assert [v["name"] for v in vms] == ["web"] and vms[0]["protected"] is False
    one = (await http.get("/api/v1/vms/web")).json()
    assert one["spec"]["level"] == 0 and one["fencing_token"] is None
    status = (await http.get("/api/v1/status")).json()
    assert [h["name"] for h in status["hosts"]] == ["h1", "h2"] and status["quorum"]["reachable"]
    # errors carry the CLI's outcome codes
    r = await http.post("/api/v1/vms", json=spec_json())
    assert r.status_code == 409 and r.json()["code"] == 4
    r = await http.patch("/api/v1/vms/web", json={"checkpoint_ms": 250})
    assert r.status_code == 400 and "level 3" in r.json()["error"]
    assert (await http.get("/api/v1/vms/nope")).status_code == 404
    r = await http.post("/api/v1/vms", json={"name": "bad"})
    assert r.status_code == 400
    r = await http.delete("/api/v1/vms/web")
    assert r.status_code == 202
    assert (await store.snapshot()).vms == {}
    events = (await http.get("/api/v1/events", params={"limit": 5})).json()
    assert "revision" in events and isinstance(events["events"], list)
    assert (await http.get("/api/v1/jobs/nope")).status_code == 404


async def test_stop_asks_the_guest_unless_forced_and_a_start_clears_force(api) -> None:
    http, store = api
    assert await store.define_vm(VmSpec("st", Level.UNPROTECTED, 256, 1, (), (NicSpec("52:54:00:00:10:04"),),
                                        desired=Desired.RUNNING))
    for bad in ({"force": "yes"}, {"force": True, "host": "h1"}, {"hurry": True}):
        assert (await http.post("/api/v1/vms/st/stop", json=bad)).status_code == 400, bad
    spec, _ = await store.spec("st")
    assert spec.desired is Desired.RUNNING and not spec.stop_force  # refused: nothing changed
    assert (await http.post("/api/v1/vms/st/stop")).status_code == 202
    spec, _ = await store.spec("st")
    assert spec.desired is Desired.STOPPED and not spec.stop_force and spec.definition  # defined with an id
    r = await http.post("/api/v1/vms/st/stop", json={"force": True})  # hurries the stop under way
    assert r.status_code == 202 and r.json()["changed"] is True
    assert (await store.spec("st"))[0].stop_force
    assert (await http.post("/api/v1/vms/st/start")).status_code == 202
    spec, _ = await store.spec("st")
    assert spec.desired is Desired.RUNNING and not spec.stop_force


async def test_level3_checkpointing_is_patched_and_bad_values_refused(api) -> None:
    http, store = api
    l3 = VmSpec("trade", Level.SYSTEM, 256, 1, (DiskSpec(size=64 << 20),), (NicSpec("52:54:00:00:10:03"),))
    assert await store.define_vm(l3)
    assert (await http.patch("/api/v1/vms/trade", json={"checkpoint_ms": 5})).status_code == 400
    r = await http.patch("/api/v1/vms/trade", json={"level": 1})  # level 3 never changes level: refused
    assert r.status_code == 409 and "level 3" in r.json()["error"]
    assert (await http.patch("/api/v1/vms/trade", json={"level": 1, "sla_percent": 99})).status_code == 400
    r = await http.patch("/api/v1/vms/trade", json={"checkpoint_ms": 250, "checkpoint_on_output": False})
    assert r.status_code == 202
    spec, _ = await store.spec("trade")
    assert (spec.checkpoint_ms, spec.checkpoint_on_output) == (250, False)


async def test_health_probes_and_restart_limits_are_patched_checked_and_refused_without_an_address(api) -> None:
    http, store = api
    assert await store.define_vm(VmSpec("hp", Level.UNPROTECTED, 256, 1, (), (NicSpec("52:54:00:00:10:05"),)))
    r = await http.patch("/api/v1/vms/hp", json={"health": "tcp:22"})
    assert r.status_code == 400 and "no address" in r.json()["error"]
    spec, rev = await store.spec("hp")
    assert await store.update_spec(replace(spec, nics=(NicSpec("52:54:00:00:10:05", "10.0.0.5/24"),)), rev)
    for bad in ({"health": "udp:53"}, {"health_failures": 0}, {"health_timeout_s": 30.0},
                {"guest_restarts": "3"}, {"guest_window_s": True}, {"health_interval_s": 0.2}):
        r = await http.patch("/api/v1/vms/hp", json=bad)
        assert r.status_code == 400 and "nothing changed" in r.json()["error"], (bad, r.text)
    assert not (await store.spec("hp"))[0].health
    r = await http.patch("/api/v1/vms/hp", json={"health": "http:8080/health", "health_interval_s": 5,
                                                   "health_failures": 2, "guest_restarts": 5,
                                                   "guest_window_s": 600})
    assert r.status_code == 202, r.text
    spec, _ = await store.spec("hp")
    assert (spec.health, spec.health_interval_s, spec.health_failures, spec.guest_restarts, spec.guest_window_s) == (
        "http:8080/health", 5.0, 2, 5, 600.0)


async def test_a_qcow2_overlay_is_refused_at_definition_and_nothing_is_defined(api, tmp_path) -> None:
    import subprocess
    http, store = api
    base, overlay = tmp_path / "base.raw", tmp_path / "over.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)], check=True)
    body = spec_json("ovl") | {"disks": [{"path": str(overlay), "format": "qcow2", "size": 0}]}
    r = await http.post("/api/v1/vms", json=body)
    assert r.status_code == 400 and f"backing file {base}" in r.json()["error"], r.text
    assert "ovl" not in (await store.snapshot()).vms


async def test_metrics_use_prometheus_names_and_units(api) -> None:
    http, store = api
    l3 = VmSpec("trade", Level.SYSTEM, 512, 1, (DiskSpec(size=64 << 20),), (NicSpec("52:54:00:00:10:03"),))
    assert await store.define_vm(l3)
    r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert '# TYPE ftvm_failovers_total counter' in text
    assert 'ftvm_failovers_total{host="h1",vm="web"} 2' in text
    assert 'ftvm_host_memory_bytes{host="h1"} 4294967296' in text
    assert 'ftvm_vm_level{vm="trade"} 3' in text and 'ftvm_vm_protected{vm="trade"} 0' in text
    assert 'ftvm_quorum_reachable{host="h1"} 1' in text and 'ftvm_lease_remaining_seconds{host="h1"} 3.2' in text
    for line in text.splitlines():  # every sample: name{labels} value, names from the family list
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert name.startswith("ftvm_") and f"# TYPE {name} " in text, line
            float(line.rsplit(" ", 1)[1])


async def test_openapi_describes_every_route(api) -> None:
    http, _ = api
    doc = (await http.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/status", "/api/v1/vms", "/api/v1/vms/{name}", "/api/v1/vms/{name}/start",
                 "/api/v1/jobs/{id}", "/api/v1/events", "/metrics"):
        assert path in doc["paths"]


async def test_availability_from_the_stored_history_against_the_sla(api) -> None:
    import time

    from ftvm.core.availability import HistoryRecord
    http, store = api
    assert (await http.post("/api/v1/vms", json=spec_json())).status_code == 202
    r = await http.patch("/api/v1/vms/web", json={"sla_percent": 99.9})
    assert r.status_code == 202
    now = time.time()
    for rec in (HistoryRecord(now - 3000, "up", "h1"), HistoryRecord(now - 2000, "down", "h1", "host h1 lost"),
                HistoryRecord(now - 1992, "up", "h2"), HistoryRecord(now - 1000, "down", "h1", "self-fenced")):
        await store.add_history("web", rec)
    r = await http.get("/api/v1/vms/web/availability", params={"days": 3600 / 86400})
    assert r.status_code == 200, r.text
    (rep,) = r.json()["reports"]
    assert rep["failovers"] == 1 and len(rep["outages"]) == 1  # h1's late self-fence is not an outage
    assert rep["unplanned_down_s"] == pytest.approx(8, abs=0.01)
    assert rep["sla_target_percent"] == 99.9 and rep["meets_sla"] is False  # 8 s of the last hour
    assert (await http.get("/api/v1/vms/nope/availability")).status_code == 404
    assert (await http.get("/api/v1/availability", params={"days": "-1"})).status_code == 400
    assert await store.trim_history(now - 1500) == 2  # keeps the newest old record (the state then)
    assert [r.kind for r in (await store.history("web"))["web"]] == ["up", "down"]


async def _running_768_mib_vm(client: EtcdClient, name: str, hosts: dict[str, int]) -> tuple[PoolStore, VmSpec]:
    """A new pool of `hosts` (name: MiB, each with a replication address) where a 768 MiB
    level 1 VM `name` runs on h1."""
    from ftvm.core.model import Desired, RunState, VmStatus
    store = PoolStore(client, f"lvl{next(_pools)}")
    leases = {}
    for i, (h, mem) in enumerate(hosts.items(), 1):
        leases[h], _ = await client.lease_grant(30)
        assert await store.register_host(HostInfo(h, mem, 4, ("/s",), leases[h], f"10.79.0.{i}"), leases[h])
    spec = VmSpec(name, Level.RESTART, 768, 1, (DiskSpec(f"/s/{name}.img"),), (NicSpec("52:54:00:00:10:02"),),
                  desired=Desired.RUNNING)
    assert await store.define_vm(spec)
    token = await store.claim(name, "h1", leases["h1"])
    assert token is not None
    assert await store.report_status(name, VmStatus("h1", RunState.RUNNING, token, 1.0), leases["h1"])
    return store, spec


async def test_a_level_change_that_cannot_be_made_is_refused_and_changes_nothing(etcd_url: str) -> None:
    """Against a real etcd: a running 768 MiB VM cannot be raised to 2 or 3 when the only
    other host could not take it over (512 MiB); a stopped VM is not changed to 3; nothing
    is recorded. A possible change is recorded as a request under the owner's lease."""
    from dataclasses import replace

    from ftvm import ops
    from ftvm.core.model import Desired
    from ftvm.errors import BAD_INPUT, REFUSED, FtvmError
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        store, spec = await _running_768_mib_vm(client, "big", {"h1": 2048, "h2": 512})
        before = await store.snapshot()
        for level in (2, 3):
            with pytest.raises(FtvmError, match="no partner has room") as e:
                await ops.change_level(store, "big", level)
            assert e.value.code == REFUSED
        with pytest.raises(FtvmError) as e:
            await ops.change_level(store, "big", 5)
        assert e.value.code == BAD_INPUT
        after = await store.snapshot()
        assert after.vms["big"].level_change is None and after.vms["big"].spec == before.vms["big"].spec
        # a stopped VM is not made level 3 (it would be added anew)
        assert await store.define_vm(replace(spec, name="cold", desired=Desired.STOPPED))
        with pytest.raises(FtvmError, match="running VM") as e:
            await ops.change_level(store, "cold", 3)
        assert e.value.code == REFUSED
        # 1 -> 0 while running is only a spec change
        assert await ops.change_level(store, "big", 0) == (1, False)
        assert (await store.snapshot()).vms["big"].spec.level is Level.UNPROTECTED


async def test_raising_to_level3_needs_room_for_the_guest_twice_on_its_host(etcd_url: str) -> None:
    """The raise moves the VM into a second QEMU on its own host: a host without the VM's
    memory free on top of its use refuses it with the figures, and nothing is recorded;
    level 2 (no second QEMU) is still possible there."""
    from ftvm import ops
    from ftvm.errors import REFUSED, FtvmError
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        store, _ = await _running_768_mib_vm(client, "mid", {"h1": 1024, "h2": 2048})
        with pytest.raises(FtvmError, match="768 MiB more needed, h1 has 256 MiB free") as e:
            await ops.change_level(store, "mid", 3)
        assert e.value.code == REFUSED
        assert (await store.snapshot()).vms["mid"].level_change is None
        assert await ops.change_level(store, "mid", 2) == (1, True)
        assert (await store.snapshot()).vms["mid"].level_change is not None
