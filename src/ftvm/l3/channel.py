"""The checkpoint link, authenticated: both ends prove they hold the pool's checkpoint key,
then every message carries a MAC under a key of that session alone.

    primary (P)                                   partner (S)
      HELLO {vm, session, files, nonce_p}  ---->  checks: partner of vm, peer address is the
                                                  owner's, no live session, sizes = the spec
                              <----  CHALLENGE {nonce_s, proof_s}  (or REFUSED "why")
      checks proof_s; AUTH proof_p  ------->      checks proof_p; only now is the replica touched

    T        = SHA-256(HELLO payload) || nonce_s            (the transcript both sign)
    proof_s  = HMAC(K, "standby" || T),  proof_p = HMAC(K, "primary" || T)
    K_sess   = HMAC(K, "session" || T)
    MAC      = HMAC(K_sess, direction || sequence number || header || payload)

Compression (between sites, where the link is slow): the primary's HELLO may ask for it
(`"compress": "zstd"`) and the partner's CHALLENGE accepts it the same way; from then on the
primary sends each large PRECOPY or CHECKPOINT as a PACKED message when zstd makes it
smaller. The MAC covers what is on the wire; the partner checks the inner type against what
it expects and inflates at most the inner type's size limit (no decompression bomb).

K is `derive(pool secret, "checkpoint stream")` (ftvm/secret.py). The two proofs differ in
their label, so neither end can be made to answer for the other; fresh nonces on both
sides make an old session's messages useless in a new one; the sequence number, counted on
each side and never sent, makes a replayed, dropped or reordered message fail its MAC.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

from .wire import HEADER, MAX_HELLO, MAX_SMALL, Msg, WireError, encode, read_header, read_message, read_payload

NONCE = 32
TAG = 32
HANDSHAKE_S = 5.0
PROTOCOL_VERSION = 2  # 2: device state patches (wire.StatePatch)
# MACs of larger messages are computed off the event loop (a checkpoint's few hundred KiB
# cost ~0.3 ms inline, less than the hand-over to a thread on a busy host)
_THREAD_ABOVE = 4 << 20
COMPRESSION = "zstd"
PACKABLE = (Msg.PRECOPY, Msg.CHECKPOINT)
PACK_ABOVE = 8 << 10          # smaller messages go as they are
PACK_HEAD = struct.Struct(">BQ")  # inner type, inner length
ZSTD_LEVEL = 1                # ~2 ms per 500 KiB here: worth it on a metro link, not on a LAN
_PACK_THREAD_ABOVE = 64 << 10  # compressed off the event loop (the output-commit relays share it)


@dataclass(frozen=True)
class LinkConfig:
    """How a primary reaches partners: their checkpoint port, the pool's checkpoint key, the
    local (replication) address it connects from, which partners check, and whether to ask
    for compression (a partner at another site: core/sites.py)."""

    port: int
    key: bytes
    local_addr: str = ""
    compress: bool = False              # this session asks for compression
    compress_when: str = "between-sites"  # host.toml `l3_compress`: which sessions ask (core/sites.py)


class AuthError(WireError):
    """The peer could not prove it holds the pool's checkpoint key, or a message failed its MAC."""


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


class Channel:
    """One authenticated session: send and receive whole messages, each with its MAC."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                 out_label: bytes, in_label: bytes, compress: bool = False, inflate: bool = False) -> None:
        self.reader, self.writer = reader, writer
        self._key, self._out, self._in = key, out_label, in_label
        self._sent = self._received = 0
        self._send_lock = asyncio.Lock()  # sequence numbers must follow the order on the wire
        self.compress, self.inflate = compress, inflate
        self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if compress else None
        self._zd = zstandard.ZstdDecompressor() if inflate else None

    def _tag(self, label: bytes, seq: int, parts: list[bytes]) -> bytes:
        h = hmac.new(self._key, label + struct.pack(">Q", seq), hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.digest()

    async def send(self, parts: list[bytes]) -> int:
        """Queue one encoded message (header first) with its MAC; the caller drains. Returns
        the bytes it takes on the wire (compressed, if it was)."""
        async with self._send_lock:
            if self._zc is not None:
                parts = await self._packed(parts)
            seq = self._sent
            self._sent += 1
            if sum(map(len, parts)) > _THREAD_ABOVE:
                tag = await asyncio.to_thread(self._tag, self._out, seq, parts)
            else:
                tag = self._tag(self._out, seq, parts)
            self.writer.writelines([*parts, tag])
            return sum(map(len, parts)) + TAG

    async def _packed(self, parts: list[bytes]) -> list[bytes]:
        """A large PRECOPY or CHECKPOINT as a PACKED message, if that is smaller."""
        assert self._zc is not None
        kind, length = HEADER.unpack(parts[0])
        if kind not in PACKABLE or length < PACK_ABOVE:
            return parts
        body = b"".join(parts[1:])
        z = (await asyncio.to_thread(self._zc.compress, body) if length > _PACK_THREAD_ABOVE
             else self._zc.compress(body))
        if len(z) + PACK_HEAD.size >= length:
            return parts
        return [HEADER.pack(Msg.PACKED, PACK_HEAD.size + len(z)), PACK_HEAD.pack(kind, length), z]

    async def receive(self, limits: dict[Msg, int],
                      alive: Callable[[], None] | None = None) -> tuple[Msg, bytes]:
        """The next message, of a type and size `limits` allows, once its MAC checks out
        (a PACKED one inflated, within its inner type's limit)."""
        packable = [limits[k] for k in PACKABLE if k in limits]
        if self._zd is not None and packable:
            limits = limits | {Msg.PACKED: PACK_HEAD.size + max(packable)}
        msg, length, header = await read_header(self.reader, limits)
        payload = await read_payload(self.reader, length, alive)
        tag = await self.reader.readexactly(TAG)
        seq = self._received
        self._received += 1
        parts = [header, payload]
        want = (await asyncio.to_thread(self._tag, self._in, seq, parts) if length > _THREAD_ABOVE
                else self._tag(self._in, seq, parts))
        if not hmac.compare_digest(tag, want):
            raise AuthError(f"{msg.name} message {seq} failed its MAC: forged, replayed or corrupted")
        if msg is Msg.PACKED:
            return await self._unpacked(payload, limits)
        return msg, payload

    async def _unpacked(self, payload: bytes, limits: dict[Msg, int]) -> tuple[Msg, bytes]:
        assert self._zd is not None
        if len(payload) < PACK_HEAD.size:
            raise WireError("PACKED message without its head")
        kind, length = PACK_HEAD.unpack_from(payload)
        try:
            inner = Msg(kind)
        except ValueError:
            raise WireError(f"PACKED message of unknown type {kind}") from None
        if inner not in PACKABLE or inner not in limits:
            raise WireError(f"unexpected PACKED {inner.name} message")
        if length > limits[inner]:
            raise WireError(f"PACKED {inner.name} message of {length} bytes (at most {limits[inner]})")
        frame = payload[PACK_HEAD.size:]
        try:
            if zstandard.frame_content_size(frame) != length:
                raise WireError(f"PACKED {inner.name} message: its frame does not hold {length} bytes")
            data = (await asyncio.to_thread(self._zd.decompress, frame, length) if length > _PACK_THREAD_ABOVE
                    else self._zd.decompress(frame, length))
        except zstandard.ZstdError as e:
            raise WireError(f"PACKED {inner.name} message does not inflate: {e}") from None
        if len(data) != length:
            raise WireError(f"PACKED {inner.name} message inflated to {len(data)} bytes, not {length}")
        return inner, data

    def close(self) -> None:
        self.writer.close()


# --- the primary's side -------------------------------------------------------------------

async def open_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                       hello: dict[str, Any], compress: bool = False) -> Channel:
    """Send HELLO, check the partner's proof, send ours. AuthError if the partner cannot
    prove it holds the key or refuses the session (its reason in the message). `compress`:
    ask for compression (used if the partner accepts)."""
    extra = {"compress": COMPRESSION} if compress else {}
    body = json.dumps(hello | extra | {"v": PROTOCOL_VERSION, "nonce": os.urandom(NONCE).hex()}).encode()
    writer.writelines(encode(Msg.HELLO, body))
    await writer.drain()
    kind, payload = await asyncio.wait_for(
        read_message(reader, {Msg.CHALLENGE: MAX_SMALL, Msg.REFUSED: MAX_SMALL}), HANDSHAKE_S)
    if kind is Msg.REFUSED:
        raise AuthError(f"the partner refused the session: {payload.decode(errors='replace')}")
    try:
        challenge = json.loads(payload)
        nonce_s, proof = bytes.fromhex(challenge["nonce"]), bytes.fromhex(challenge["proof"])
    except (ValueError, KeyError, TypeError):
        raise AuthError("malformed CHALLENGE") from None
    if len(nonce_s) != NONCE:
        raise AuthError("malformed CHALLENGE nonce")
    transcript = hashlib.sha256(body).digest() + nonce_s
    if not hmac.compare_digest(proof, _mac(key, b"standby", transcript)):
        raise AuthError("the partner does not hold this pool's checkpoint key")
    writer.writelines(encode(Msg.AUTH, _mac(key, b"primary", transcript)))
    await writer.drain()
    return Channel(reader, writer, _mac(key, b"session", transcript), b"P", b"S",
                   compress=compress and challenge.get("compress") == COMPRESSION)


# --- the partner's side -------------------------------------------------------------------

async def read_hello(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The HELLO a new connection must start with: a JSON object of the expected shape."""
    _, body = await asyncio.wait_for(read_message(reader, {Msg.HELLO: MAX_HELLO}), HANDSHAKE_S)
    try:
        hello = json.loads(body)
    except ValueError:
        raise WireError("HELLO is not JSON") from None
    if not isinstance(hello, dict):
        raise WireError("HELLO is not a JSON object")
    if hello.get("v") != PROTOCOL_VERSION:
        raise WireError(f"HELLO of protocol version {hello.get('v')!r}; this agent speaks {PROTOCOL_VERSION}")
    nonce = hello.get("nonce")
    if not isinstance(nonce, str) or len(nonce) != 2 * NONCE:
        raise WireError("HELLO without a valid nonce")
    return hello, body


async def accept_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes,
                         hello_body: bytes) -> Channel:
    """After the HELLO was found acceptable: prove ours, check the primary's. Compression is
    accepted when the HELLO asks for it."""
    nonce_s = os.urandom(NONCE)
    transcript = hashlib.sha256(hello_body).digest() + nonce_s
    inflate = json.loads(hello_body).get("compress") == COMPRESSION
    writer.writelines(encode(Msg.CHALLENGE, json.dumps(
        {"nonce": nonce_s.hex(), "proof": _mac(key, b"standby", transcript).hex()}
        | ({"compress": COMPRESSION} if inflate else {})).encode()))
    await writer.drain()
    _, proof = await asyncio.wait_for(read_message(reader, {Msg.AUTH: MAX_SMALL}), HANDSHAKE_S)
    if not hmac.compare_digest(proof, _mac(key, b"primary", transcript)):
        raise AuthError("the primary does not hold this pool's checkpoint key")
    return Channel(reader, writer, _mac(key, b"session", transcript), b"S", b"P", inflate=inflate)


async def refuse(writer: asyncio.StreamWriter, why: str) -> None:
    """Tell the connecting side why (it logs it), then close."""
    try:
        writer.writelines(encode(Msg.REFUSED, why.encode()[:MAX_SMALL]))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
