"""The lab client: writes to the ledger guest and logs every acknowledgement.

Runs inside the client namespace (`python -m ftvm.lab.client ...`). One
JSON line per event goes to --out, flushed at once, so the demo and tests can
follow it while it runs and check later that every acknowledged record is on
the VM's disk:

    {"t": 1700000000.123, "kind": "ack", "n": 17, "payload": "c-17", "seq": 17}
    {"t": ..., "kind": "error", "error": "timed out"}     (then it reconnects)
    {"t": ..., "kind": "connect"}

A request that was sent but not acknowledged is sent again after reconnecting
(the ledger may then hold it twice; only acknowledged records are checked).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class Ack:
    t: float
    n: int
    payload: str
    seq: int


def run(host: str, port: int, out: IO[str], interval: float, duration: float, prefix: str,
        reply_timeout: float) -> None:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    end = time.time() + duration if duration > 0 else float("inf")
    n = 1

    def log(**kw: object) -> None:
        out.write(json.dumps({"t": time.time(), **kw}) + "\n")
        out.flush()

    while not stop[0] and time.time() < end:
        try:
            sock = socket.create_connection((host, port), timeout=1.0)
        except OSError as e:
            log(kind="error", error=f"connect: {e}")
            time.sleep(0.1)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(reply_timeout)
        log(kind="connect")
        reader = sock.makefile("rb")
        try:
            while not stop[0] and time.time() < end:
                payload = f"{prefix}-{n}"
                sock.sendall(f"W {payload}\n".encode())
                line = reader.readline()
                if not line:
                    raise OSError("connection closed")
                parts = line.decode().split()
                if len(parts) != 3 or parts[0] != "OK":
                    raise OSError(f"unexpected reply {line!r}")
                log(kind="ack", n=n, payload=payload, seq=int(parts[1]))
                n += 1
                if interval:
                    time.sleep(interval)
        except OSError as e:
            log(kind="error", error=str(e) or type(e).__name__)
        finally:
            sock.close()


def read_log(path: Path) -> tuple[list[Ack], list[dict[str, object]]]:
    """(acks, other events) from a client log; a torn last line is ignored."""
    acks, other = [], []
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("kind") == "ack":
            acks.append(Ack(d["t"], d["n"], d["payload"], d["seq"]))
        else:
            other.append(d)
    return acks, other


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftvm-lab-client")
    p.add_argument("--target", required=True, help="HOST:PORT of the ledger")
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.02, help="pause between requests (s)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: never)")
    p.add_argument("--prefix", default="c")
    p.add_argument("--reply-timeout", type=float, default=2.0)
    a = p.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    with open(a.out, "a") as out:
        run(host, int(port), out, a.interval, a.duration, a.prefix, a.reply_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
