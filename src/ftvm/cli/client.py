"""How the CLI reaches the pool.

Through an agent's REST API wherever one is configured: `--api URL[,URL...]` (or
`FTVM_API`) with the token from `--api-token-file` / `FTVM_API_TOKEN_FILE` /
`FTVM_API_TOKEN`, or the running lab's agents. The URLs are tried in order (a host
down costs one connect timeout, then the answering agent is kept). Given only etcd
endpoints (`--etcd` / `FTVM_ETCD`), or with `--direct`, the CLI talks to the store
itself, through the same `ops` the API runs: a recovery path that needs no agent.

Both return plain data (the `views` rows), so the commands print the same either way.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol, cast

from .. import ops
from ..core.model import Desired, VmSpec
from ..errors import BAD_INPUT, FAILED, NO_QUORUM, FtvmError
from ..store.pool import Event, PoolStore
from ..views import HostRow, VmRow, host_rows, row_of, status_data, vm_detail
from ..pki import TlsFiles
from .common import endpoints, pool_ca, with_store

CONNECT_TIMEOUT_S = 1.5
REQUEST_TIMEOUT_S = 30.0


class PoolClient(Protocol):
    where: str  # for messages: "API http://..." or "etcd http://..."

    def status(self) -> dict[str, Any]: ...
    def hosts(self) -> list[HostRow]: ...
    def vms(self) -> list[VmRow]: ...
    def vm(self, name: str) -> VmRow: ...
    def row(self, name: str) -> VmRow | None: ...
    def define(self, spec: VmSpec) -> None: ...
    def set_desired(self, name: str, desired: Desired, force: bool = False) -> bool: ...
    def force_start(self, name: str, host: str | None) -> str: ...
    def repair_disk(self, name: str, host: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def patch(self, name: str, changes: dict[str, Any]) -> dict[str, Any]: ...
    def change_level(self, name: str, level: int, disk_paths: tuple[str, ...],
                     overwrite: bool = False) -> tuple[int, bool]: ...
    def migrate(self, name: str, to: str) -> str: ...
    def start_maintenance(self, host: str, reason: str) -> dict[str, str]: ...
    def end_maintenance(self, host: str) -> None: ...
    def events(self, limit: int, since_revision: int = 0) -> tuple[list[Event], int]: ...
    def availability(self, days: float, names: list[str]) -> list[dict[str, Any]]: ...
    def dr_targets(self) -> list[dict[str, Any]]: ...
    def dr_replicas(self) -> list[dict[str, Any]]: ...
    def dr_test(self, pool: str, vm: str, point: int | None) -> dict[str, Any]: ...
    def dr_test_end(self, pool: str, vm: str) -> None: ...
    def dr_failover(self, pool: str, vm: str, point: int | None, accept_data_loss: bool,
                    level: int = 0) -> dict[str, Any]: ...
    def write_trace(self, vm: str, seconds: int) -> str: ...
    def dr_failback(self, pool: str, vm: str, target: str, rpo_s: float, switch: bool) -> dict[str, Any]: ...
    def set_dr_target(self, name: str, receivers: list[str]) -> None: ...
    def remove_dr_target(self, name: str) -> None: ...


def pool_client(args: Any) -> PoolClient:
    """The API if one is configured or the lab runs agents serving it, else the store."""
    api = getattr(args, "api", None) or os.environ.get("FTVM_API")
    if getattr(args, "direct", False):
        return DirectClient(args)
    if api:
        return HttpClient(api.split(","), _token(args), pool_ca(args))
    if getattr(args, "etcd", None) or os.environ.get("FTVM_ETCD"):
        return DirectClient(args)
    from ..lab.lab import DEFAULT_DIR, LabError, load_state
    try:
        state = load_state(Path(getattr(args, "lab_dir", None) or DEFAULT_DIR))
    except LabError:
        return DirectClient(args)  # raises the "no quorum service given" error on first use
    if getattr(args, "lab_dr", False):  # the lab's DR pool (`lab up --dr`)
        if not state.dr_hosts:
            raise FtvmError("this lab has no DR site (`ftvm lab up --dr`)", BAD_INPUT)
        return HttpClient([state.api_url(h) for h in state.dr_hosts],
                          (state.dr_pki_dir / "api-token").read_text().strip(), state.dr_pki_dir / "ca.crt")
    if not state.api_token_file.exists():
        return DirectClient(args)
    alive = [h for h in state.hosts if h not in state.failed] + [h for h in state.failed]
    return HttpClient([state.api_url(h) for h in alive], state.api_token_file.read_text().strip(),
                      state.pki_dir / "ca.crt")


def _token(args: Any) -> str:
    path = getattr(args, "api_token_file", None) or os.environ.get("FTVM_API_TOKEN_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise FtvmError(f"cannot read the API token file {path}: {e}", BAD_INPUT) from None
    token = os.environ.get("FTVM_API_TOKEN", "")
    if not token:
        raise FtvmError("the API needs a token: --api-token-file FILE, FTVM_API_TOKEN_FILE or FTVM_API_TOKEN",
                        BAD_INPUT)
    return token


class DirectClient:
    """Straight to the store, with the same `ops` as the API."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.where = "etcd"

    def _snap(self):  # type: ignore[no-untyped-def]
        return with_store(self.args, lambda s: s.snapshot())

    def status(self) -> dict[str, Any]:
        urls, pool = endpoints(self.args)
        return status_data(self._snap(), urls, pool)

    def hosts(self) -> list[HostRow]:
        return host_rows(self._snap())

    def vms(self) -> list[VmRow]:
        return self.status()["vms"]

    def vm(self, name: str) -> VmRow:
        snap, view = with_store(self.args, lambda s: ops.get_view(s, name))
        return vm_detail(snap, view)

    def row(self, name: str) -> VmRow | None:
        return row_of(self._snap(), name)

    def define(self, spec: VmSpec) -> None:
        with_store(self.args, lambda s: ops.define(s, spec))

    def set_desired(self, name: str, desired: Desired, force: bool = False) -> bool:
        return with_store(self.args, lambda s: ops.set_desired(s, name, desired, force))

    def force_start(self, name: str, host: str | None) -> str:
        return with_store(self.args, lambda s: ops.force_start(s, name, host))

    def repair_disk(self, name: str, host: str) -> None:
        with_store(self.args, lambda s: ops.repair_disk(s, name, host))

    def remove(self, name: str) -> None:
        with_store(self.args, lambda s: ops.remove(s, name))

    def patch(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        async def apply(s: PoolStore) -> dict[str, Any]:
            return (await ops.patch(s, name, changes)).to_json()
        return with_store(self.args, apply)

    def change_level(self, name: str, level: int, disk_paths: tuple[str, ...],
                     overwrite: bool = False) -> tuple[int, bool]:
        return with_store(self.args, lambda s: ops.change_level(s, name, level, disk_paths, overwrite))

    def migrate(self, name: str, to: str) -> str:
        return with_store(self.args, lambda s: ops.migrate(s, name, to)).source

    def start_maintenance(self, host: str, reason: str) -> dict[str, str]:
        return with_store(self.args, lambda s: ops.start_maintenance(s, host, reason))

    def end_maintenance(self, host: str) -> None:
        with_store(self.args, lambda s: ops.end_maintenance(s, host))

    def dr_targets(self) -> list[dict[str, Any]]:
        snap = with_store(self.args, lambda s: s.snapshot())
        return [t.to_json() for t in snap.dr_targets.values()]

    def set_dr_target(self, name: str, receivers: list[str]) -> None:
        with_store(self.args, lambda s: ops.set_dr_target(s, name, receivers))

    def dr_replicas(self) -> list[dict[str, Any]]:
        snap = with_store(self.args, lambda s: s.snapshot())
        return [r.to_json() for _, r in sorted(snap.dr_replicas.items())]

    def dr_test(self, pool: str, vm: str, point: int | None) -> dict[str, Any]:
        return dict(with_store(self.args, lambda s: ops.dr_test(s, vm, pool, point)).__dict__)

    def dr_test_end(self, pool: str, vm: str) -> None:
        with_store(self.args, lambda s: ops.dr_test_end(s, vm, pool))

    def dr_failover(self, pool: str, vm: str, point: int | None, accept_data_loss: bool,
                    level: int = 0) -> dict[str, Any]:
        return dict(with_store(self.args, lambda s: ops.dr_failover(s, vm, pool, point, accept_data_loss,
                                                                    level)).__dict__)

    def dr_failback(self, pool: str, vm: str, target: str, rpo_s: float, switch: bool) -> dict[str, Any]:
        return dict(with_store(self.args, lambda s: ops.dr_failback(s, vm, pool, target, rpo_s, switch)).__dict__)

    def write_trace(self, vm: str, seconds: int) -> str:
        raise FtvmError(f"{vm}'s write-rate trace is kept by the agent running it: reach the pool through its "
                        "API (--api, FTVM_API, or the lab's agents), or give --trace FILE", BAD_INPUT)

    def remove_dr_target(self, name: str) -> None:
        with_store(self.args, lambda s: ops.remove_dr_target(s, name))

    def events(self, limit: int, since_revision: int = 0) -> tuple[list[Event], int]:
        return with_store(self.args, lambda s: s.events(limit=limit, since_revision=since_revision))

    def availability(self, days: float, names: list[str]) -> list[dict[str, Any]]:
        import time
        end = time.time()
        reports = with_store(self.args, lambda s: ops.availability(s, end - days * 86400, end, names or None))
        return [r.to_json() for r in reports]


class HttpClient:
    """The agents' REST API (`src/ftvm/api/openapi.json`)."""

    def __init__(self, urls: list[str], token: str, ca: Path | None = None) -> None:
        """`ca`: the pool CA the agents' certificates are checked against (https)."""
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self._tls = TlsFiles(ca).client_context() if ca is not None else None
        self.where = f"API {self.urls[0]}"

    def _call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        """The answer's JSON (`raw`: its text)."""
        data = None if body is None else json.dumps(body).encode()
        errors = []
        for i, base in enumerate(list(self.urls)):
            req = urllib.request.Request(base + path, data=data, method=method, headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            try:
                # connect within CONNECT_TIMEOUT_S: a lost host must not hold the command up
                with urllib.request.urlopen(req, timeout=CONNECT_TIMEOUT_S if i < len(self.urls) - 1
                                            else REQUEST_TIMEOUT_S, context=self._tls) as r:
                    text = r.read().decode()
            except urllib.error.HTTPError as e:
                try:
                    err = json.loads(e.read().decode())
                except ValueError:
                    err = {"error": f"HTTP {e.code}", "code": FAILED}
                if e.code == 401:
                    raise FtvmError(f"API {base}: {err.get('error', 'unauthorized')}", BAD_INPUT) from None
                raise FtvmError(str(err.get("error", e.reason)), int(err.get("code", FAILED))) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                errors.append(f"{base}: {getattr(e, 'reason', e)}")
                continue
            if i:  # keep the agent that answered first in line
                self.urls.insert(0, self.urls.pop(i))
                self.where = f"API {self.urls[0]}"
            return text if raw else json.loads(text) if text else None
        raise FtvmError("no agent API answered (" + "; ".join(errors) + ")", NO_QUORUM)

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/v1/status"))

    def hosts(self) -> list[HostRow]:
        return cast(list[HostRow], self._call("GET", "/api/v1/hosts"))  # views.host_rows, as JSON

    def vms(self) -> list[VmRow]:
        return cast(list[VmRow], self._call("GET", "/api/v1/vms"))  # views.vm_rows, as JSON

    def vm(self, name: str) -> VmRow:
        return cast(VmRow, self._call("GET", f"/api/v1/vms/{_q(name)}"))  # views.vm_detail, as JSON

    def row(self, name: str) -> VmRow | None:
        return next((r for r in self.vms() if r["name"] == name), None)

    def define(self, spec: VmSpec) -> None:
        self._call("POST", "/api/v1/vms", spec.to_json())

    def set_desired(self, name: str, desired: Desired, force: bool = False) -> bool:
        action = "start" if desired is Desired.RUNNING else "stop"
        body = {"force": True} if force else None
        return bool(self._call("POST", f"/api/v1/vms/{_q(name)}/{action}", body).get("changed", True))

    def force_start(self, name: str, host: str | None) -> str:
        r = self._call("POST", f"/api/v1/vms/{_q(name)}/start", {"accept_data_loss": True, "host": host})
        return str(r["forced_host"])

    def repair_disk(self, name: str, host: str) -> None:
        self._call("POST", f"/api/v1/vms/{_q(name)}/repair-disk", {"host": host})

    def remove(self, name: str) -> None:
        self._call("DELETE", f"/api/v1/vms/{_q(name)}")

    def patch(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        self._call("PATCH", f"/api/v1/vms/{_q(name)}", changes)
        return dict(self.vm(name)["spec"])

    def change_level(self, name: str, level: int, disk_paths: tuple[str, ...],
                     overwrite: bool = False) -> tuple[int, bool]:
        before = self.vm(name)
        job = self._call("PATCH", f"/api/v1/vms/{_q(name)}", {"level": level, "disk_paths": list(disk_paths),
                                                               "overwrite": overwrite})
        return int(job.get("previous_level", before["level"] or 0)), job.get("online", True)

    def migrate(self, name: str, to: str) -> str:
        source = self.vm(name)["host"]
        self._call("POST", f"/api/v1/vms/{_q(name)}/migrate", {"to": to})
        return str(source)

    def start_maintenance(self, host: str, reason: str) -> dict[str, str]:
        return dict(self._call("POST", f"/api/v1/hosts/{_q(host)}/maintenance", {"reason": reason})["moves"])

    def end_maintenance(self, host: str) -> None:
        self._call("POST", f"/api/v1/hosts/{_q(host)}/resume")

    def dr_targets(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/v1/dr-targets")["targets"])

    def dr_replicas(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/v1/dr-replicas")["replicas"])

    def dr_test(self, pool: str, vm: str, point: int | None) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/v1/dr-replicas/{_q(pool)}/{_q(vm)}/test",
                               {"point": point} if point is not None else {}))

    def dr_test_end(self, pool: str, vm: str) -> None:
        self._call("DELETE", f"/api/v1/dr-replicas/{_q(pool)}/{_q(vm)}/test")

    def dr_failback(self, pool: str, vm: str, target: str, rpo_s: float, switch: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"switch": True} if switch else {"target": target, "rpo_s": rpo_s}
        return dict(self._call("POST", f"/api/v1/dr-replicas/{_q(pool)}/{_q(vm)}/failback", body))

    def write_trace(self, vm: str, seconds: int) -> str:
        return str(self._call("GET", f"/api/v1/vms/{_q(vm)}/write-trace?seconds={seconds}", raw=True))

    def dr_failover(self, pool: str, vm: str, point: int | None, accept_data_loss: bool,
                    level: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = {"accept_data_loss": accept_data_loss, "level": level}
        if point is not None:
            body["point"] = point
        return dict(self._call("POST", f"/api/v1/dr-replicas/{_q(pool)}/{_q(vm)}/failover", body))

    def set_dr_target(self, name: str, receivers: list[str]) -> None:
        self._call("PUT", f"/api/v1/dr-targets/{_q(name)}", {"receivers": receivers})

    def remove_dr_target(self, name: str) -> None:
        self._call("DELETE", f"/api/v1/dr-targets/{_q(name)}")

    def events(self, limit: int, since_revision: int = 0) -> tuple[list[Event], int]:
        r = self._call("GET", f"/api/v1/events?limit={limit}&since_revision={since_revision}")
        return [Event(**e) for e in r["events"]], int(r["revision"])

    def vm_log(self, name: str, offset: int | None) -> dict[str, Any]:
        """A chunk of the VM's serial log (api/console.py): from `offset`, or its tail."""
        query = "" if offset is None else f"?offset={offset}"
        return dict(self._call("GET", f"/api/v1/vms/{_q(name)}/log{query}"))

    @property
    def tls(self) -> ssl.SSLContext | None:
        """How the agents' certificates are checked (None: plain http, tests only)."""
        return self._tls

    def availability(self, days: float, names: list[str]) -> list[dict[str, Any]]:
        if not names:
            return list(self._call("GET", f"/api/v1/availability?days={days}")["reports"])
        return [rep for n in names
                for rep in self._call("GET", f"/api/v1/vms/{_q(n)}/availability?days={days}")["reports"]]


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")
