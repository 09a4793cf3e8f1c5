"""A hostile peer for the lab's tests: `python -m ftvm.lab.hostile SCENARIO ...`, run inside
a namespace (`ip netns exec`), prints what the target answered as one JSON line.

It knows the protocols but not the pool's keys: it is what anyone on the replication
or quorum network could try.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
from typing import Any

from ..l3.channel import PROTOCOL_VERSION
from ..l3.wire import HEADER, STATE_WHOLE, Msg


def _recv_message(sock: socket.socket) -> tuple[int, bytes] | None:
    """One reply message, None if the peer closed the connection instead."""
    try:
        head = sock.recv(HEADER.size, socket.MSG_WAITALL)
        if len(head) < HEADER.size:
            return None
        kind, length = HEADER.unpack(head)
        return kind, sock.recv(min(length, 4096), socket.MSG_WAITALL)
    except (ConnectionError, TimeoutError, OSError):
        return None


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionError, TimeoutError, OSError):
        return True


def _connect(addr: str, port: int, source: str | None) -> socket.socket | dict[str, Any]:
    """A connection, or what stopped it (a network that has no route there refuses too)."""
    try:
        return socket.create_connection((addr, port), timeout=10,
                                        source_address=(source, 0) if source else None)
    except OSError as e:
        return {"reply": "unreachable", "closed": True, "error": f"{type(e).__name__}: {e}"}


def checkpoint_stream(addr: str, port: int, how: str, vm: str, sizes: list[int],
                      source: str | None = None) -> dict[str, Any]:
    sock = _connect(addr, port, source)
    if isinstance(sock, dict):
        return sock
    hello = json.dumps({"v": PROTOCOL_VERSION, "vm": vm, "session": "forged", "nonce": os.urandom(32).hex(),
                        "files": [{"name": f"f{i}", "size": s} for i, s in enumerate(sizes)]}).encode()
    if how == "checkpoint-first":  # no handshake at all: a checkpoint straight away
        body = struct.pack(">QH", 1, 1) + struct.pack(">HQ", 0, 1) + struct.pack(">q", 0) + b"\xcc" * 4096 \
            + struct.pack(">BQ", STATE_WHOLE, 0)
        sock.sendall(HEADER.pack(Msg.CHECKPOINT, len(body)) + body)
        return {"closed": _closed(sock)}
    if how == "huge-hello":
        sock.sendall(HEADER.pack(Msg.HELLO, 1 << 30))
        return {"closed": _closed(sock)}
    sock.sendall(HEADER.pack(Msg.HELLO, len(hello)) + hello)
    reply = _recv_message(sock)
    if reply is None:
        return {"reply": "closed"}
    kind, payload = reply
    if kind == Msg.REFUSED:
        return {"reply": "refused", "why": payload.decode(errors="replace"), "closed": _closed(sock)}
    if kind != Msg.CHALLENGE:
        return {"reply": f"type {kind}"}
    # a challenge: answer with a guess, then try a forged checkpoint and ACK as if accepted
    sock.sendall(HEADER.pack(Msg.AUTH, 32) + os.urandom(32))
    sock.sendall(HEADER.pack(Msg.ACK, 8) + struct.pack(">Q", 1 << 40) + os.urandom(32))
    return {"reply": "challenge", "closed": _closed(sock)}


def nbd(addr: str, port: int) -> dict[str, Any]:
    """The NBD greeting comes before TLS; then ask for an export in the clear."""
    sock = _connect(addr, port, None)
    if isinstance(sock, dict):
        return sock | {"error": True, "greeting": None}
    greeting = sock.recv(18, socket.MSG_WAITALL)
    sock.sendall(struct.pack(">I", 1))  # client flags: fixed newstyle
    # NBD_OPT_GO without TLS: a server that requires TLS must refuse it
    name = b"anything"
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
    reply = sock.recv(20, socket.MSG_WAITALL)
    magic, opt, rtype, length = struct.unpack(">QIII", reply) if len(reply) == 20 else (0, 0, 0, 0)
    return {"greeting": greeting[:8].decode(errors="replace"), "reply_type": rtype,
            "error": bool(rtype & 0x80000000)}


def etcd(url: str, ca: str) -> dict[str, Any]:
    """The quorum service without a client certificate (the CA is public)."""
    import urllib.request
    ctx = ssl.create_default_context(cafile=ca)
    try:
        with urllib.request.urlopen(url + "/v3/kv/range", data=b'{"key":"Lw=="}', timeout=10, context=ctx) as r:
            return {"answered": True, "status": r.status}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"answered": False, "error": f"{type(e).__name__}: {e}"[:300]}


def api(url: str, ca: str, read_token: str) -> dict[str, Any]:
    """The REST API in plain HTTP, then over HTTPS with no token and with the read-only one."""
    import urllib.error
    import urllib.parse
    import urllib.request
    u = urllib.parse.urlsplit(url)
    out: dict[str, Any] = {}
    sock = _connect(u.hostname or "", u.port or 443, None)
    if isinstance(sock, dict):
        return sock
    sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        out["plain_reply"] = sock.recv(64).decode(errors="replace")
    except OSError as e:
        out["plain_reply"] = f"{type(e).__name__}"
    ctx = ssl.create_default_context(cafile=ca)

    def status(method: str, token: str | None) -> int:
        req = urllib.request.Request(url + "/api/v1/vms/nosuchvm", method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
    out["no_token"] = status("GET", None)
    out["read_token_delete"] = status("DELETE", read_token)
    return out


def main(argv: list[str]) -> None:
    what = argv[0]
    if what == "l3":
        out = checkpoint_stream(argv[1], int(argv[2]), argv[3], argv[4], [int(s) for s in argv[5].split(",")],
                                argv[6] if len(argv) > 6 else None)
    elif what == "nbd":
        out = nbd(argv[1], int(argv[2]))
    elif what == "etcd":
        out = etcd(argv[1], argv[2])
    elif what == "api":
        out = api(argv[1], argv[2], argv[3])
    else:
        raise SystemExit(f"unknown scenario {what}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
