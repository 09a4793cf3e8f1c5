"""`ftvm vm console NAME` and `ftvm vm log NAME [-f]`: a VM's serial console and log,
through the agents' API (api/console.py), wherever the VM runs.

The console is raw: every key goes to the guest, except Ctrl-] (0x1d), which detaches (as
`virsh console`). When the VM's QEMU ends (a stop, a migration, a failover) the console
attaches again to wherever the VM runs next, until detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import time
import tty
import urllib.parse
from typing import Any

import aiohttp

from .client import HttpClient, pool_client
from .common import BAD_INPUT, OK, CliError, emit_json, is_json

DETACH = b"\x1d"  # Ctrl-]
RETRY_S = 0.5


def _api(args: Any) -> HttpClient:
    client = pool_client(args)
    if not isinstance(client, HttpClient):
        raise CliError("the console and the log are served by the agents: give their API (--api URL or FTVM_API, "
                       "with --api-token-file)", BAD_INPUT)
    return client


def cmd_vm_log(args: Any) -> int:
    client = _api(args)
    offset: int | None = 0 if args.all else None
    log_id = None
    waiting = ""
    while True:
        try:
            chunk = client.vm_log(args.name, offset)
        except CliError as e:
            if not args.follow:
                raise
            if str(e) != waiting:  # the VM is moving or stopped: say so once, then wait
                waiting = str(e)
                _say(f"[ftvm: {e}; waiting]", raw=False)
            time.sleep(RETRY_S)
            continue
        waiting = ""
        if log_id is not None and chunk["log_id"] != log_id and offset:
            _say(f"[ftvm: {args.name} runs on {chunk['host']} now: its serial log from that start]", raw=False)
            log_id, offset = chunk["log_id"], 0
            continue
        log_id = chunk["log_id"]
        if is_json(args) and not args.follow:
            emit_json(chunk)
            return OK
        sys.stdout.write(chunk["text"])
        sys.stdout.flush()
        offset = chunk["next"]
        if offset < chunk["size"]:
            continue  # more than one chunk waiting
        if not args.follow:
            return OK
        time.sleep(RETRY_S)


def cmd_vm_console(args: Any) -> int:
    client = _api(args)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd)
    try:
        return asyncio.run(_console(client, args.name, args.takeover, raw=saved is not None))
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _say(text: str, raw: bool) -> None:
    sys.stderr.write(("\r\n" if raw else "") + text + ("\r\n" if raw else "\n"))
    sys.stderr.flush()


async def _console(client: HttpClient, name: str, takeover: bool, raw: bool) -> int:
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    fd = sys.stdin.fileno()

    def readable() -> None:
        data = os.read(fd, 4096)
        keys.put_nowait(data if data else DETACH)  # stdin closed: detach
    loop.add_reader(fd, readable)
    path = f"/api/v1/vms/{urllib.parse.quote(name, safe='')}/console" + ("?takeover=1" if takeover else "")
    headers = {"Authorization": f"Bearer {client.token}"}
    said = ""
    try:
        # (a host that lost power costs one connect timeout, then the next agent is asked)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0)) as session:
            while True:
                ws, why = await _attach(session, client, path, headers)
                if ws is None:
                    if why != said:
                        said = why
                        _say(f"[ftvm: {why}; trying again, Ctrl-] detaches]", raw)
                    if await _detached_while_waiting(keys):
                        return OK
                    continue
                said = ""
                _say(f"[ftvm: connected to {name}'s serial console; Ctrl-] detaches]", raw)
                if await _session(ws, keys):
                    await ws.close()
                    _say("[ftvm: detached]", raw)
                    return OK
                _say(f"[ftvm: {name}'s console closed (stopped, moved or failed over); attaching again]", raw)
                takeover = False
    finally:
        loop.remove_reader(fd)


async def _attach(session: aiohttp.ClientSession, client: HttpClient, path: str,
                  headers: dict[str, str]) -> tuple[aiohttp.ClientWebSocketResponse | None, str]:
    why = "no agent answered"
    for base in client.urls:
        try:
            ws = await session.ws_connect(base + path, headers=headers, ssl=client.tls or False,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=5.0), heartbeat=20.0)
            return ws, ""
        except aiohttp.WSServerHandshakeError as e:
            why = f"{base}: {e.status} {e.message}"
            if e.status in (401, 403):
                raise CliError(f"API {base}: the token may not open a console ({e.status})", BAD_INPUT) from None
            if e.status == 409 or e.status == 404:  # the VM is not running (yet) or not known: the agent says why
                why = await _reason(session, base + path.split("/console")[0], headers) or why
                break
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            why = f"{base}: {e}"
    return None, why


async def _reason(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    """Why the console is not there: the VM's state as the API gives it."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
            data = await r.json()
            if "error" in data:
                return str(data["error"])
            return f"the VM is {data['state']}" + (f" on {data['host']}" if data.get("host") else "")
    return ""


async def _detached_while_waiting(keys: asyncio.Queue[bytes]) -> bool:
    try:
        data = await asyncio.wait_for(keys.get(), RETRY_S)
    except TimeoutError:
        return False
    return DETACH in data  # other keys typed while no console is there are dropped


async def _session(ws: aiohttp.ClientWebSocketResponse, keys: asyncio.Queue[bytes]) -> bool:
    """Until detached (True) or the console closes (False)."""
    async def to_guest() -> bool:
        while True:
            data = await keys.get()
            if DETACH in data:
                before = data.split(DETACH, 1)[0]
                if before:
                    await ws.send_bytes(before)
                return True
            await ws.send_bytes(data)

    async def from_guest() -> bool:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                sys.stdout.buffer.write(msg.data)
                sys.stdout.buffer.flush()
        return False
    tasks = [asyncio.ensure_future(to_guest()), asyncio.ensure_future(from_guest())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    return bool(next(iter(done)).result())
