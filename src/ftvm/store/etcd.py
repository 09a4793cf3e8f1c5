"""A small asyncio etcd v3 client over the HTTP/JSON gateway (no gRPC).

Only what ftvm needs: range, put, delete, transactions, leases and a watch.
Keys and values are bytes on the wire (base64 in JSON); this module takes
and returns `str` keys and `bytes` values. The transport is an httpx seam so
tests can substitute it.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx


class EtcdError(Exception):
    """Base of every error this client raises. `code`: the gRPC status code etcd gave
    (NOT_FOUND, ...), 0 when it gave none."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


GRPC_NOT_FOUND = 5


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time: treat as loss of quorum."""


@contextmanager
def _reply(what: str) -> Iterator[None]:
    """A reply that does not have the shape etcd gives is an etcd error (the caller's
    retry and quorum-loss handling apply), never an exception that ends a loop."""
    try:
        yield
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise EtcdError(f"etcd {what}: malformed reply ({type(e).__name__}: {e})") from None


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def prefix_end(prefix: str) -> bytes:
    """The range_end that selects every key starting with `prefix`."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def json(self) -> Any:
        return json.loads(self.value)

    @staticmethod
    def parse(d: dict[str, Any]) -> KeyValue:
        return KeyValue(
            key=_unb64(d["key"]).decode(),
            value=_unb64(d.get("value", "")),
            create_revision=int(d.get("create_revision", 0)),
            mod_revision=int(d.get("mod_revision", 0)),
            version=int(d.get("version", 0)),
            lease=int(d.get("lease", 0)),
        )


# --- transaction building blocks -------------------------------------------------

@dataclass(frozen=True)
class Compare:
    """`target` is one of VERSION, CREATE, MOD, VALUE; `result` EQUAL, NOT_EQUAL, GREATER, LESS."""

    key: str
    target: str
    result: str
    value: int | bytes

    def body(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": _b64(self.key), "target": self.target, "result": self.result}
        field_name = {"VERSION": "version", "CREATE": "create_revision",
                      "MOD": "mod_revision", "VALUE": "value"}[self.target]
        d[field_name] = _b64(self.value) if self.target == "VALUE" else str(self.value)  # type: ignore[arg-type]
        return d


def absent(key: str) -> Compare:
    return Compare(key, "CREATE", "EQUAL", 0)


def present(key: str) -> Compare:
    return Compare(key, "CREATE", "GREATER", 0)


def created_at(key: str, revision: int) -> Compare:
    return Compare(key, "CREATE", "EQUAL", revision)


def modified_at(key: str, revision: int) -> Compare:
    return Compare(key, "MOD", "EQUAL", revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0

    def body(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            d["lease"] = str(self.lease)
        return {"request_put": d}


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False

    def body(self) -> dict[str, Any]:
        d = {"key": _b64(self.key)}
        if self.prefix:
            d["range_end"] = _b64(prefix_end(self.key))
        return {"request_delete_range": d}


@dataclass(frozen=True)
class Get:
    key: str

    def body(self) -> dict[str, Any]:
        return {"request_range": {"key": _b64(self.key)}}


def put_json(key: str, value: Any, lease: int = 0) -> Put:
    return Put(key, json.dumps(value, sort_keys=True).encode(), lease)


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]] = field(default_factory=list)

    def range_kvs(self, index: int) -> list[KeyValue]:
        with _reply("txn range"):
            r = self.responses[index].get("response_range", {})
            return [KeyValue.parse(kv) for kv in r.get("kvs", [])]


@dataclass(frozen=True)
class WatchEvent:
    type: str  # PUT or DELETE
    kv: KeyValue


class EtcdClient:
    def __init__(self, endpoints: list[str], timeout: float = 1.0,
                 transport: httpx.AsyncBaseTransport | None = None, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: verifies https endpoints against the pool CA and presents our client
        certificate (pki.TlsFiles.client_context); needed for any https:// endpoint."""
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        if any(e.startswith("https://") for e in self.endpoints) and tls is None:
            raise ValueError("https etcd endpoints need the pool CA and a client certificate")
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport,
                                       verify=tls if tls is not None else True)
        self._preferred = 0
        self.requests = 0  # for the control-plane cost figures

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        last: Exception | None = None
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._preferred + i) % n
            try:
                self.requests += 1
                r = await self._http.post(self.endpoints[idx] + path, json=body,
                                          timeout=timeout or self.timeout)
            except httpx.HTTPError as e:
                last = e
                continue
            self._preferred = idx
            with _reply(path):
                data = r.json()
                if not isinstance(data, dict):
                    raise TypeError("not a JSON object")
            if r.status_code != 200 or "error" in data:
                code = data.get("code")
                raise EtcdError(f"etcd {path}: {data.get('message') or data.get('error') or r.status_code}",
                                code if isinstance(code, int) and not isinstance(code, bool) else 0)
            return data
        raise EtcdUnavailable(f"no etcd endpoint answered ({', '.join(self.endpoints)}): {last!r}")

    # --- key/value ---------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        data = await self._post("/v3/kv/range", {"key": _b64(key)})
        with _reply("range"):
            kvs = data.get("kvs", [])
            return KeyValue.parse(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str, revision: int = 0, last: int = 0,
                         min_mod_revision: int = 0) -> tuple[list[KeyValue], int]:
        """Keys under `prefix` in key order; `last` > 0 keeps only the last N keys (etcd sorts
        and limits), `min_mod_revision` only keys changed at or after that revision."""
        body: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        if revision:
            body["revision"] = str(revision)
        if last:
            body.update(limit=str(last), sort_order="DESCEND", sort_target="KEY")
        if min_mod_revision:
            body["min_mod_revision"] = str(min_mod_revision)
        data = await self._post("/v3/kv/range", body)
        with _reply("range"):
            kvs = [KeyValue.parse(kv) for kv in data.get("kvs", [])]
            return (kvs[::-1] if last else kvs), int(data["header"]["revision"])

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        data = await self._post("/v3/kv/put", Put(key, value, lease).body()["request_put"])
        with _reply("put"):
            return int(data["header"]["revision"])

    async def delete(self, key: str, prefix: bool = False) -> int:
        data = await self._post("/v3/kv/deleterange", Delete(key, prefix).body()["request_delete_range"])
        with _reply("deleterange"):
            return int(data.get("deleted", 0))

    async def txn(self, compare: list[Compare], success: list[Put | Delete | Get],
                  failure: list[Put | Delete | Get] | None = None) -> TxnResult:
        body = {"compare": [c.body() for c in compare],
                "success": [op.body() for op in success],
                "failure": [op.body() for op in (failure or [])]}
        data = await self._post("/v3/kv/txn", body)
        with _reply("txn"):
            return TxnResult(succeeded=bool(data.get("succeeded", False)),
                             revision=int(data["header"]["revision"]),
                             responses=list(data.get("responses", [])))

    # --- leases ------------------------------------------------------------------
    async def lease_grant(self, ttl: float) -> tuple[int, int]:
        data = await self._post("/v3/lease/grant", {"TTL": str(max(1, round(ttl)))})
        with _reply("lease grant"):
            return int(data["ID"]), int(data["TTL"])

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease; returns its TTL, 0 if it has already expired."""
        data = await self._post("/v3/lease/keepalive", {"ID": str(lease_id)})
        with _reply("lease keepalive"):
            return int(data.get("result", {}).get("TTL", 0))

    async def lease_time_to_live(self, lease_id: int) -> tuple[int, int]:
        """A lease's seconds left (whole, rounded down; -1: expired or unknown) and granted."""
        data = await self._post("/v3/lease/timetolive", {"ID": str(lease_id)})
        with _reply("lease time to live"):
            return int(data.get("TTL", -1)), int(data.get("grantedTTL", 0))

    async def lease_revoke(self, lease_id: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if e.code != GRPC_NOT_FOUND:  # an unknown lease is revoked already
                raise

    # --- watch -------------------------------------------------------------------
    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Yield batches of events on keys under `prefix`, from `start_revision` on.
        Ends (raises EtcdUnavailable) when the stream breaks; the caller re-reads and re-watches."""
        body = {"create_request": {"key": _b64(prefix),
                                   "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision)}}
        url = self.endpoints[self._preferred] + "/v3/watch"
        try:
            async with self._http.stream("POST", url, json=body,
                                         timeout=httpx.Timeout(self.timeout, read=None)) as r:
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    with _reply("watch"):
                        result = json.loads(line).get("result", {})
                        events = [WatchEvent(type=e.get("type", "PUT"), kv=KeyValue.parse(e["kv"]))
                                  for e in result.get("events", [])]
                    if events:
                        yield events
        except httpx.HTTPError as e:
            raise EtcdUnavailable(f"watch broke: {e!r}") from e
        raise EtcdUnavailable("watch stream ended")
