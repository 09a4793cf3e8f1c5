"""An in-memory model of etcd v3, as ftvm uses it through the JSON gateway (store/etcd.py):
revisions, create/mod revisions and versions, leases that expire on a given clock, ranges
(prefix, limit, descending order, min_mod_revision, past revisions), puts, deletes and
transactions with compares. `SimEtcdClient` is the real `EtcdClient` with its HTTP call
replaced by this model, so every request the real store code builds (store/pool.py) is
served here, and a fault plan may drop it before it is applied or lose its answer after.

The store contract tests (tests/integration/test_store_contract.py) run against both this
model and a real etcd: what they check, the model does as etcd does.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..store.etcd import EtcdClient, EtcdError, EtcdUnavailable, KeyValue, WatchEvent, prefix_end

GRPC_NOT_FOUND = 5
GRPC_INVALID_ARGUMENT = 3


def _dec(s: str) -> bytes:
    return base64.b64decode(s)


def _enc(b: bytes) -> str:
    return base64.b64encode(b).decode()


@dataclass
class _Version:
    revision: int
    value: bytes | None   # None: deleted at that revision
    create_revision: int
    version: int
    lease: int


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[bytes] = field(default_factory=set)


class MemEtcd:
    """One etcd cluster's data, on `clock` (seconds; the simulator's, or time.monotonic)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.revision = 1
        self._history: dict[bytes, list[_Version]] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x1000

    # --- the data -------------------------------------------------------------------
    def _current(self, key: bytes) -> _Version | None:
        versions = self._history.get(key)
        if not versions or versions[-1].value is None:
            return None
        return versions[-1]

    def _at(self, key: bytes, revision: int) -> _Version | None:
        for v in reversed(self._history.get(key, [])):
            if v.revision <= revision:
                return v if v.value is not None else None
        return None

    def expire_leases(self) -> None:
        """Leases past their time go, with their keys (one revision each, as etcd does)."""
        now = self.clock()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires <= now]:
            self._revoke(lease_id)

    def _revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id)
        if lease.keys:
            self.revision += 1
            for key in sorted(lease.keys):
                self._delete_one(key)

    def _put_one(self, key: bytes, value: bytes, lease: int) -> None:
        if lease and lease not in self._leases:
            raise EtcdError("etcdserver: requested lease not found", GRPC_NOT_FOUND)
        cur = self._current(key)
        if cur is not None and cur.lease and cur.lease != lease and cur.lease in self._leases:
            self._leases[cur.lease].keys.discard(key)
        create = cur.create_revision if cur is not None else self.revision
        version = cur.version + 1 if cur is not None else 1
        self._history.setdefault(key, []).append(_Version(self.revision, value, create, version, lease))
        if lease:
            self._leases[lease].keys.add(key)

    def _delete_one(self, key: bytes) -> bool:
        cur = self._current(key)
        if cur is None:
            return False
        if cur.lease in self._leases:
            self._leases[cur.lease].keys.discard(key)
        self._history[key].append(_Version(self.revision, None, 0, 0, 0))
        return True

    def _keys(self, key: bytes, range_end: bytes | None) -> list[bytes]:
        if range_end is None:
            return [key]
        return sorted(k for k in self._history if key <= k and (range_end == b"\0" or k < range_end))

    def changes(self, key: bytes, range_end: bytes, since: int) -> list[WatchEvent]:
        """Every change to the keys in [key, range_end) at revision `since` or later, in order."""
        found: list[tuple[int, bytes, _Version]] = []
        for k in self._keys(key, range_end):
            found += [(v.revision, k, v) for v in self._history[k] if v.revision >= since]
        found.sort(key=lambda t: (t[0], t[1]))
        return [WatchEvent("DELETE" if v.value is None else "PUT",
                           KeyValue(k.decode(), v.value or b"", v.create_revision, v.revision, v.version, v.lease))
                for _, k, v in found]

    def _kv(self, key: bytes, v: _Version) -> dict[str, Any]:
        return {"key": _enc(key), "value": _enc(v.value or b""), "create_revision": str(v.create_revision),
                "mod_revision": str(v.revision), "version": str(v.version), "lease": str(v.lease)}

    # --- requests, as the JSON gateway takes them -----------------------------------------
    def handle(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._handle(path, body)
        except (KeyError, ValueError, TypeError) as e:  # (the gateway's answer to a malformed request)
            raise EtcdError(f"bad request: {type(e).__name__}: {e}", GRPC_INVALID_ARGUMENT) from None

    def _handle(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.expire_leases()
        header = lambda: {"revision": str(self.revision)}  # noqa: E731 - (after the change)
        if path == "/v3/kv/range":
            return self._range(body) | {"header": header()}
        if path == "/v3/kv/put":
            self.revision += 1
            try:
                self._put_one(_dec(body["key"]), _dec(body.get("value", "")), int(body.get("lease", 0)))
            except EtcdError:
                self.revision -= 1
                raise
            return {"header": header()}
        if path == "/v3/kv/deleterange":
            keys = self._keys(_dec(body["key"]), _dec(body["range_end"]) if "range_end" in body else None)
            live = [k for k in keys if self._current(k) is not None]
            if live:
                self.revision += 1
                for k in live:
                    self._delete_one(k)
            return {"header": header(), "deleted": str(len(live))}
        if path == "/v3/kv/txn":
            return self._txn(body) | {"header": header()}
        if path == "/v3/lease/grant":
            ttl = int(body["TTL"])
            self._next_lease += 1
            self._leases[self._next_lease] = _Lease(ttl, self.clock() + ttl)
            return {"header": header(), "ID": str(self._next_lease), "TTL": str(ttl)}
        if path == "/v3/lease/keepalive":
            lease = self._leases.get(int(body["ID"]))
            if lease is None:
                return {"result": {"header": header(), "ID": body["ID"]}}
            lease.expires = self.clock() + lease.ttl
            return {"result": {"header": header(), "ID": body["ID"], "TTL": str(lease.ttl)}}
        if path == "/v3/lease/timetolive":
            lease = self._leases.get(int(body["ID"]))
            if lease is None:
                return {"header": header(), "ID": body["ID"], "TTL": "-1"}
            return {"header": header(), "ID": body["ID"], "TTL": str(int(lease.expires - self.clock())),
                    "grantedTTL": str(lease.ttl)}
        if path == "/v3/lease/revoke":
            lease_id = int(body["ID"])
            if lease_id not in self._leases:
                raise EtcdError("etcdserver: requested lease not found", GRPC_NOT_FOUND)
            self._revoke(lease_id)
            return {"header": header()}
        raise EtcdError(f"the model does not serve {path}")

    def _range(self, body: dict[str, Any]) -> dict[str, Any]:
        revision = int(body.get("revision", 0)) or self.revision
        keys = self._keys(_dec(body["key"]), _dec(body["range_end"]) if "range_end" in body else None)
        found = [(k, v) for k in keys if (v := self._at(k, revision)) is not None]
        min_mod = int(body.get("min_mod_revision", 0))
        if min_mod:
            found = [(k, v) for k, v in found if v.revision >= min_mod]
        if body.get("sort_order") == "DESCEND":
            found.reverse()
        limit = int(body.get("limit", 0))
        if limit:
            found = found[:limit]
        return {"kvs": [self._kv(k, v) for k, v in found], "count": str(len(found))}

    def _compare(self, c: dict[str, Any]) -> bool:
        cur = self._current(_dec(c["key"]))
        target = c["target"]
        if target == "VALUE":
            have: int | bytes = cur.value or b"" if cur is not None else b""
            want: int | bytes = _dec(c.get("value", ""))
        else:
            field_name = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}[target]
            have = 0 if cur is None else {"version": cur.version, "create_revision": cur.create_revision,
                                          "mod_revision": cur.revision}[field_name]
            want = int(c.get(field_name, 0))
        result = c["result"]
        if result == "EQUAL":
            return have == want
        if result == "NOT_EQUAL":
            return have != want
        if result == "GREATER":
            return have > want  # type: ignore[operator]
        if result == "LESS":
            return have < want  # type: ignore[operator]
        raise EtcdError(f"compare result {result}")

    def _txn(self, body: dict[str, Any]) -> dict[str, Any]:
        ok = all(self._compare(c) for c in body.get("compare", []))
        ops = body.get("success" if ok else "failure", [])
        writes = any("request_put" in op or "request_delete_range" in op for op in ops)
        for op in ops:  # (etcd refuses a txn whose puts name an unknown lease, applying nothing)
            lease = int(op.get("request_put", {}).get("lease", 0))
            if lease and lease not in self._leases:
                raise EtcdError("etcdserver: requested lease not found", GRPC_NOT_FOUND)
        if writes:
            self.revision += 1
        responses: list[dict[str, Any]] = []
        for op in ops:
            if "request_put" in op:
                p = op["request_put"]
                self._put_one(_dec(p["key"]), _dec(p.get("value", "")), int(p.get("lease", 0)))
                responses.append({"response_put": {}})
            elif "request_delete_range" in op:
                d = op["request_delete_range"]
                keys = self._keys(_dec(d["key"]), _dec(d["range_end"]) if "range_end" in d else None)
                deleted = sum(self._delete_one(k) for k in keys)
                responses.append({"response_delete_range": {"deleted": str(deleted)}})
            elif "request_range" in op:
                responses.append({"response_range": self._range(op["request_range"])})
        return {"succeeded": ok, "responses": responses}


class SimEtcdClient(EtcdClient):
    """The real client, served by a MemEtcd. `fault(path)` (the simulator's) says what goes
    wrong with one request: "" nothing, "drop" (never applied: the client sees the cluster
    unavailable) or "lose" (applied, but the answer is lost: the client cannot tell)."""

    def __init__(self, model: MemEtcd, fault: Callable[[str], str] = lambda path: "") -> None:
        # (no HTTP client: the model answers in process)
        self.endpoints, self.timeout, self._preferred, self.requests = ["sim://etcd"], 1.0, 0, 0
        self.model, self.fault = model, fault

    async def close(self) -> None:
        pass

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self.requests += 1
        what = self.fault(path)
        if what == "drop":
            raise EtcdUnavailable(f"no etcd endpoint answered (sim: {path} dropped)")
        data = self.model.handle(path, body)
        if what == "lose":
            raise EtcdUnavailable(f"no etcd endpoint answered (sim: the answer to {path} was lost)")
        return data

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Changes under `prefix` from `start_revision` on, looked for every 10 ms."""
        start = prefix.encode()
        end = prefix_end(prefix)
        while True:
            if self.fault("/v3/watch") == "drop":
                raise EtcdUnavailable("watch broke (sim)")
            self.model.expire_leases()
            events = self.model.changes(start, end, start_revision)
            if events:
                start_revision = max(e.kv.mod_revision for e in events) + 1
                yield events
            await asyncio.sleep(0.01)
