"""A VM's serial console and log through the API, wherever the VM runs.

    GET /api/v1/vms/{name}/log?offset=N    the serial log since its QEMU started, from byte N
                                           (default: its last TAIL_BYTES), at most CHUNK_BYTES
    GET /api/v1/vms/{name}/console         a WebSocket to the serial console (admin token);
                                           binary messages both ways, one session per VM
                                           (?takeover=1 ends the one open)
    GET /api/v1/vms/{name}/write-trace?seconds=N  its guest's bytes written per second, the
                                           newest N (default and most a day): `seconds,bytes`
                                           lines (agent/write_trace.py), for `ftvm dr model VM`

Any agent answers: the agent running the VM serves it from its QEMU's files; another
forwards the request to that agent's API (`HostInfo.api_url`) once, with the caller's own
token, over https checked against the pool CA. After a failover or a migration the VM's
log is the new QEMU's (a new `log_id`), and a console client attaches again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..errors import BAD_INPUT, NOT_FOUND, REFUSED, FtvmError
from ..qemu.cmdline import VmPaths

VIA = "X-Ftvm-Forwarded-By"  # set on a forwarded request: never forwarded twice
TAIL_BYTES = 16 * 1024
CHUNK_BYTES = 64 * 1024
MAX_INPUT = 4096            # bytes of one console message from a client
FORWARD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0     # an owner that lost power does not hold the caller up for long


@dataclass
class ConsoleContext:
    me: str
    local_paths: Callable[[str], VmPaths | None]  # the files of the QEMU running a VM here
    peer_tls: ssl.SSLContext | None               # to reach other agents' APIs
    sessions: dict[str, web.WebSocketResponse] = field(default_factory=dict)  # open consoles here
    local_trace: Callable[[str], Path] | None = None  # a VM's write-rate trace file here


def read_log(path: Path, host: str, offset: int | None) -> dict[str, Any]:
    """A chunk of a serial log: from `offset` (None: the tail), at most CHUNK_BYTES.
    `log_id` changes when a new QEMU starts a new log (the client starts over)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            start = max(0, size - TAIL_BYTES) if offset is None or offset > size else offset
            f.seek(start)
            data = f.read(CHUNK_BYTES)
    except FileNotFoundError:
        st, size, start, data = None, 0, 0, b""
    return {"host": host, "log_id": f"{host}:{st.st_ino}:{st.st_ctime_ns}" if st else f"{host}:none",
            "offset": start, "next": start + len(data), "size": size,
            "text": data.decode("utf-8", errors="replace")}


def _owner_url(snapshot: Any, name: str) -> tuple[str, str]:
    """(owner host, its API url) of a running VM; FtvmError when it runs nowhere or its
    agent serves no API."""
    view = snapshot.vms.get(name)
    if view is None:
        raise FtvmError(f"unknown VM {name!r}", NOT_FOUND)
    if view.owner is None:
        raise FtvmError(f"VM {name} is not running on any host", REFUSED)
    host = view.owner.host
    info = snapshot.hosts.get(host)
    if info is None or not info.api_url:
        raise FtvmError(f"VM {name} runs on {host}, whose agent serves no API", REFUSED)
    return host, info.api_url


async def serve_log(request: web.Request, ctx: ConsoleContext, snapshot: Any) -> web.Response:
    name = request.match_info["name"]
    raw = request.query.get("offset")
    try:
        offset = int(raw) if raw is not None else None
    except ValueError:
        raise FtvmError("offset must be an integer", BAD_INPUT) from None
    if offset is not None and offset < 0:
        raise FtvmError("offset must be 0 or more", BAD_INPUT)
    host, url = _owner_url(snapshot, name)
    if host == ctx.me:
        paths = ctx.local_paths(name)
        if paths is None:
            raise FtvmError(f"VM {name} is not running here yet", REFUSED)
        return web.json_response(await asyncio.to_thread(read_log, paths.serial, host, offset))
    _refuse_second_hop(request, name, host)
    return await _forwarded_get(request, ctx, host, url, "application/json")


async def serve_trace(request: web.Request, ctx: ConsoleContext, snapshot: Any) -> web.Response:
    from ..agent.write_trace import MAX_SECONDS, read_trace
    name = request.match_info["name"]
    raw = request.query.get("seconds", str(MAX_SECONDS))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_SECONDS:
        raise FtvmError(f"seconds must be 1 to {MAX_SECONDS}", BAD_INPUT)
    host, url = _owner_url(snapshot, name)
    if host == ctx.me:
        if ctx.local_trace is None:
            raise FtvmError("this agent records no write-rate traces", REFUSED)
        text = await asyncio.to_thread(read_trace, ctx.local_trace(name), int(raw))
        if not text:
            raise FtvmError(f"no write-rate trace of {name} on {host} yet (one sample a second once it runs)",
                            NOT_FOUND)
        return web.Response(text=text, content_type="text/csv")
    _refuse_second_hop(request, name, host)
    return await _forwarded_get(request, ctx, host, url, "text/csv")


async def _forwarded_get(request: web.Request, ctx: ConsoleContext, host: str, url: str,
                         content_type: str) -> web.Response:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S,
                                                                   sock_connect=CONNECT_TIMEOUT_S)) as session:
        try:
            async with session.get(url + request.path_qs, headers=_forward_headers(request, ctx),
                                   ssl=ctx.peer_tls or False) as r:
                body = await r.read()
                return web.Response(body=body, status=r.status,
                                    content_type=content_type if r.status == 200 else "application/json")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise FtvmError(f"the agent of {host} did not answer: {e}", REFUSED) from None


async def serve_console(request: web.Request, ctx: ConsoleContext, snapshot: Any) -> web.StreamResponse:
    name = request.match_info["name"]
    host, url = _owner_url(snapshot, name)
    takeover = request.query.get("takeover") in ("1", "true")
    if host != ctx.me:
        _refuse_second_hop(request, name, host)
        return await _forward_console(request, ctx, host, url)
    paths = ctx.local_paths(name)
    if paths is None:
        raise FtvmError(f"VM {name} is not running here yet", REFUSED)
    open_one = ctx.sessions.get(name)
    if open_one is not None and not open_one.closed:
        if not takeover:
            raise FtvmError(f"a console session of {name} is open already (takeover=1 ends it)", REFUSED)
        await open_one.close(message=b"another console session took over")
    try:
        reader, writer = await asyncio.open_unix_connection(str(paths.console))
    except OSError as e:
        raise FtvmError(f"VM {name}'s console cannot be reached: {e}", REFUSED) from None
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_INPUT)
    await ws.prepare(request)
    ctx.sessions[name] = ws

    async def guest_to_client() -> None:
        while data := await reader.read(4096):
            await ws.send_bytes(data)

    async def client_to_guest() -> None:
        async for msg in ws:
            if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                writer.write(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
                await writer.drain()
    try:
        await _first_to_end(guest_to_client(), client_to_guest())
    finally:
        writer.close()
        if ctx.sessions.get(name) is ws:
            del ctx.sessions[name]
        await ws.close()
    return ws


async def _forward_console(request: web.Request, ctx: ConsoleContext, host: str, url: str) -> web.StreamResponse:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S))
    try:
        try:
            upstream = await session.ws_connect(url + request.path_qs, headers=_forward_headers(request, ctx),
                                                ssl=ctx.peer_tls or False, timeout=aiohttp.ClientWSTimeout(
                                                    ws_receive=None, ws_close=FORWARD_TIMEOUT_S),
                                                max_msg_size=CHUNK_BYTES)
        except aiohttp.WSServerHandshakeError as e:
            raise FtvmError(f"the agent of {host} refused the console ({e.status}: {e.message})", REFUSED) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise FtvmError(f"the agent of {host} did not answer: {e}", REFUSED) from None
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_INPUT)
        await ws.prepare(request)

        async def pump(src: Any, dst: Any) -> None:
            async for msg in src:
                if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                    await dst.send_bytes(data)
        try:
            await _first_to_end(pump(upstream, ws), pump(ws, upstream))
        finally:
            await upstream.close()
            await ws.close()
        return ws
    finally:
        await session.close()


async def _first_to_end(*work: Any) -> None:
    """Run both directions of a session; when one ends (a side closed), end the other."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def _refuse_second_hop(request: web.Request, name: str, host: str) -> None:
    if request.headers.get(VIA):
        raise FtvmError(f"VM {name} does not run here (forwarded by {request.headers[VIA]}; it runs on {host} "
                        "in this agent's view)", REFUSED)


def _forward_headers(request: web.Request, ctx: ConsoleContext) -> dict[str, str]:
    return {"Authorization": request.headers.get("Authorization", ""), VIA: ctx.me}
