"""A VM's serial console and log through the API (api/console.py), against a real etcd and
two agents' API servers: the owner's serves them from the QEMU's files (here a unix socket
server standing in for QEMU's console chardev), the other forwards to it."""

from __future__ import annotations

import asyncio
import itertools
import socket
from pathlib import Path

import aiohttp
import pytest

from ftvm.api.console import CHUNK_BYTES, ConsoleContext
from ftvm.api.metrics import AgentCounters, AgentHealth
from ftvm.api.server import ApiContext, make_app, serve
from ftvm.core.model import HostInfo, Level, NicSpec, VmSpec
from ftvm.qemu.cmdline import VmPaths
from ftvm.store.etcd import EtcdClient
from ftvm.store.pool import PoolStore

TOKEN = "test-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
_pools = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _echo_console(path: Path) -> asyncio.Server:
    """Like a guest shell on the serial line: answers every line with "got: <line>"."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"login banner\r\n")
        while line := await reader.readline():
            writer.write(b"got: " + line.strip() + b"\r\n")
            await writer.drain()
    return await asyncio.start_unix_server(handle, str(path))


@pytest.fixture
async def pool(etcd_url: str, tmp_path: Path):
    """h1 runs VM web (its run dir has a console socket and a serial log); h2 runs nothing."""
    run = VmPaths(tmp_path / "web")
    run.run_dir.mkdir()
    run.serial.write_bytes(b"".join(b"boot line %d\n" % i for i in range(5000)))
    console_server = await _echo_console(run.console)
    ports = {"h1": _free_port(), "h2": _free_port()}
    runners = []
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        store = PoolStore(client, f"console{next(_pools)}")
        lease, _ = await client.lease_grant(30)
        for h in ("h1", "h2"):
            assert await store.register_host(HostInfo(h, 4096, 4, ("/s",), api_url=f"http://127.0.0.1:{ports[h]}"),
                                             lease)
        spec = VmSpec("web", Level.RESTART, 256, 1, (), (NicSpec("52:54:00:00:10:01"),))
        assert await store.define_vm(spec)
        assert await store.claim("web", "h1", lease)
        for h in ("h1", "h2"):
            consoles = ConsoleContext(h, lambda name, h=h: run if h == "h1" and name == "web" else None, None)
            ctx = ApiContext(store, "p", [etcd_url], TOKEN, store.snapshot,
                             lambda h=h: AgentHealth(h, True, 5.0, 3.2), AgentCounters(), read_token=READER,
                             console=consoles)
            runners.append(await serve(make_app(ctx), "127.0.0.1", ports[h], None))
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                yield http, {h: f"http://127.0.0.1:{p}" for h, p in ports.items()}, run
        finally:
            for r in runners:
                await r.cleanup()
            console_server.close()


async def test_the_log_is_served_by_the_owner_and_forwarded_by_any_other_agent(pool) -> None:
    http, url, run = pool
    whole = run.serial.read_bytes()
    for h in ("h1", "h2"):
        async with http.get(url[h] + "/api/v1/vms/web/log") as r:
            tail = await r.json()
        assert r.status == 200 and tail["host"] == "h1"
        assert whole.endswith(tail["text"].encode()) and 0 < len(tail["text"]) <= 16 * 1024
        got, offset = b"", 0
        while True:
            async with http.get(url[h] + f"/api/v1/vms/web/log?offset={offset}") as r:
                chunk = await r.json()
            assert len(chunk["text"]) <= CHUNK_BYTES and chunk["log_id"] == tail["log_id"]
            got += chunk["text"].encode()
            offset = chunk["next"]
            if offset >= chunk["size"]:
                break
        assert got == whole
    for bad in ("offset=-1", "offset=x"):
        async with http.get(url["h2"] + f"/api/v1/vms/web/log?{bad}") as r:
            assert r.status == 400
    async with http.get(url["h2"] + "/api/v1/vms/nope/log") as r:
        assert r.status == 404 and "unknown VM" in (await r.json())["error"]


async def _read_until(ws: aiohttp.ClientWebSocketResponse, text: bytes) -> bytes:
    seen = b""
    async with asyncio.timeout(10):
        while text not in seen:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            seen += msg.data
    return seen


async def test_the_console_works_through_either_agent_one_session_at_a_time(pool) -> None:
    http, url, _ = pool
    async with http.ws_connect(url["h2"] + "/api/v1/vms/web/console") as ws:  # forwarded to h1
        assert b"login banner" in await _read_until(ws, b"banner")
        await ws.send_bytes(b"uname\n")
        await _read_until(ws, b"got: uname")
        # a second session is refused while one is open, unless it takes over
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url["h1"] + "/api/v1/vms/web/console")
        assert refused.value.status == 409
        async with http.ws_connect(url["h1"] + "/api/v1/vms/web/console?takeover=1") as ws2:
            await ws2.send_bytes(b"again\n")
            await _read_until(ws2, b"got: again")
            async with asyncio.timeout(10):
                while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                        aiohttp.WSMsgType.CLOSING):
                    pass  # the first session was ended


async def test_the_read_only_token_cannot_type_into_a_guest(pool) -> None:
    _, url, _ = pool
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {READER}"}) as reader:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await reader.ws_connect(url["h1"] + "/api/v1/vms/web/console")
        assert refused.value.status == 403
        async with reader.get(url["h2"] + "/api/v1/vms/web/log") as r:
            assert r.status == 200  # the log is a read
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(url["h1"] + "/api/v1/vms/web/log") as r:
            assert r.status == 401
