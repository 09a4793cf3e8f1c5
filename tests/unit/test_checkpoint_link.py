"""The level 3 checkpoint link as an attacker sees it: the handshake, the per-message MACs,
the per-type size limits and the page bounds. Real sockets on loopback, no QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftvm.l3.channel import PROTOCOL_VERSION, AuthError, accept_session, open_session, read_hello
from ftvm.l3.pages import PAGE, Delta
from ftvm.l3.wire import (HEADER, PRIMARY_LIMITS, Checkpoint, Msg, WireError, decode_ack, decode_checkpoint,
                          decode_precopy, encode, encode_ack, encode_checkpoint, encode_heartbeat, read_message,
                          standby_limits)

KEY = os.urandom(32)
HELLO = {"vm": "ft", "session": "s1", "files": [{"name": "ram", "size": 1 << 20}]}


async def pair(primary_key: bytes = KEY, standby_key: bytes = KEY, compress: bool = False):
    """A primary and a partner channel over a real loopback connection."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        try:
            hello, body = await read_hello(reader)
            accepted.set_result((hello, await accept_session(reader, writer, standby_key, body)))
        except Exception as e:  # noqa: BLE001 - handed to the test
            accepted.set_exception(e)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        primary = await open_session(reader, writer, primary_key, HELLO, compress=compress)
    except Exception:
        server.close()
        raise
    hello, standby = await accepted
    return server, primary, standby, hello


async def test_both_ends_authenticate_and_messages_flow() -> None:
    server, primary, standby, hello = await pair()
    assert hello["vm"] == "ft" and hello["v"] == PROTOCOL_VERSION
    limits = standby_limits([256])
    cp = Checkpoint(1, {0: Delta(np.array([3]), b"x" * PAGE)}, b"dev")
    await primary.send(encode_checkpoint(cp))
    kind, payload = await standby.receive(limits)
    assert kind is Msg.CHECKPOINT and decode_checkpoint(payload, [256]).epoch == 1
    await standby.send(encode_ack(1))
    kind, payload = await primary.receive(PRIMARY_LIMITS)
    assert (kind, decode_ack(payload)) == (Msg.ACK, 1)
    primary.close()
    standby.close()
    server.close()


async def test_a_peer_without_the_key_is_refused_on_both_sides() -> None:
    with pytest.raises(AuthError, match="partner does not hold"):
        await pair(standby_key=os.urandom(32))
    with pytest.raises(AuthError, match="partner does not hold"):  # seen first by the primary
        await pair(primary_key=os.urandom(32))
    # an attacker posing as the primary answers the challenge with a guess
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(reader, writer):
        try:
            _, body = await read_hello(reader)
            result.set_result(await accept_session(reader, writer, KEY, body))
        except Exception as e:  # noqa: BLE001 - handed to the test
            result.set_exception(e)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    body = json.dumps(HELLO | {"v": PROTOCOL_VERSION, "nonce": os.urandom(32).hex()}).encode()
    writer.writelines(encode(Msg.HELLO, body))
    await read_message(reader, {Msg.CHALLENGE: 1024})
    writer.writelines(encode(Msg.AUTH, os.urandom(32)))
    with pytest.raises(AuthError, match="primary does not hold"):
        await result
    server.close()


async def test_forged_replayed_and_oversized_messages_are_refused() -> None:
    server, primary, standby, _ = await pair()
    # a forged ACK (no valid MAC) written into the partner's direction of the stream
    standby.writer.writelines(encode_ack(99) + [b"\0" * 32])
    with pytest.raises(AuthError, match="failed its MAC"):
        await primary.receive(PRIMARY_LIMITS)
    server.close()

    server, primary, standby, _ = await pair()
    await standby.send(encode_heartbeat())  # a valid message, then the same bytes again: a replay
    msg = encode_heartbeat()
    tag = standby._tag(b"S", 0, msg)
    standby.writer.writelines([*msg, tag])
    assert (await primary.receive(PRIMARY_LIMITS))[0] is Msg.HEARTBEAT
    with pytest.raises(AuthError):
        await primary.receive(PRIMARY_LIMITS)
    server.close()

    server, primary, standby, _ = await pair()
    standby.writer.writelines([HEADER.pack(Msg.ACK, 1 << 34)])  # an "ACK" of 16 GiB: refused unread
    with pytest.raises(WireError, match="at most 8"):
        await primary.receive(PRIMARY_LIMITS)
    standby.writer.writelines(encode(Msg.PRECOPY, b"x"))  # a type the primary never receives
    server.close()


async def test_the_hello_is_checked_before_anything_else() -> None:
    async def hello_of(raw: bytes) -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        await read_hello(reader)

    for raw in (b"".join(encode(Msg.ACK, struct.pack(">Q", 1))),          # not a HELLO
                HEADER.pack(Msg.HELLO, 1 << 30),                         # a 1 GiB HELLO
                b"".join(encode(Msg.HELLO, b"{")),                        # not JSON
                b"".join(encode(Msg.HELLO, json.dumps(HELLO).encode())),  # no version, no nonce
                b"".join(encode(Msg.HELLO, json.dumps(HELLO | {"v": PROTOCOL_VERSION, "nonce": "00"}).encode()))):
        with pytest.raises(WireError):
            await hello_of(raw)


def test_pages_outside_the_replica_are_refused() -> None:
    def payload(index: int, pages: list[int]) -> bytes:
        return b"".join(encode_checkpoint(Checkpoint(1, {index: Delta(np.array(pages, dtype=np.int64),
                                                                      b"\0" * PAGE * len(pages))}, b""))[1:])
    for index, pages in ((0, [256]), (0, [-1]), (1, [0]), (0, list(range(257)))):
        with pytest.raises(WireError):
            decode_checkpoint(payload(index, pages), [256])
    assert decode_checkpoint(payload(0, [0, 255]), [256]).epoch == 1
    with pytest.raises(WireError):
        decode_ack(b"\0" * 9)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([Msg.CHECKPOINT, Msg.PRECOPY]))
def test_fuzz_any_bytes_decode_to_a_valid_message_or_a_wire_error(raw: bytes, kind: Msg) -> None:
    npages = [4, 2]
    try:
        if kind is Msg.CHECKPOINT:
            cp = decode_checkpoint(raw, npages)
            deltas = cp.deltas.items()
        else:
            deltas = [decode_precopy(raw, npages)]
    except WireError:
        return
    for index, delta in deltas:  # whatever decodes can be applied without writing out of bounds
        assert 0 <= index < len(npages) and len(delta.data) == PAGE * len(delta.pages)
        assert all(0 <= p < npages[index] for p in delta.pages)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_stream_headers_respect_the_limits(raw: bytes) -> None:
    async def read() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        kind, payload = await read_message(reader, PRIMARY_LIMITS)
        assert len(payload) <= PRIMARY_LIMITS[kind]
    try:
        asyncio.run(read())
    except (WireError, asyncio.IncompleteReadError):
        pass


async def test_compression_is_asked_accepted_and_only_used_where_it_pays() -> None:
    server, primary, standby, hello = await pair(compress=True)
    assert hello["compress"] == "zstd" and primary.compress and standby.inflate
    limits = standby_limits([256])
    pages = np.arange(64, dtype=np.int64)
    cp = Checkpoint(1, {0: Delta(pages, b"ledger record " * (64 * PAGE // 14) + b"\0" * (64 * PAGE % 14))}, b"dev")
    raw = sum(map(len, encode_checkpoint(cp)))
    wire = await primary.send(encode_checkpoint(cp))
    kind, payload = await standby.receive(limits)
    assert kind is Msg.CHECKPOINT and decode_checkpoint(payload, [256]).deltas[0].data == cp.deltas[0].data
    assert wire < raw / 10, (wire, raw)
    noise = Checkpoint(2, {0: Delta(pages, os.urandom(64 * PAGE))}, b"dev")  # does not compress: sent as is
    assert await primary.send(encode_checkpoint(noise)) == sum(map(len, encode_checkpoint(noise))) + 32
    assert decode_checkpoint((await standby.receive(limits))[1], [256]).epoch == 2
    primary.close()
    standby.close()
    server.close()
    server, primary, standby, hello = await pair()  # not asked: not used
    assert "compress" not in hello and not primary.compress and not standby.inflate
    server.close()


async def test_a_packed_message_is_bounded_by_its_inner_type_before_it_is_inflated() -> None:
    """A partner inflates only a type it expects, to at most that type's limit, and exactly
    the size the message declares: no decompression bomb, no type smuggled inside."""
    import zstandard

    from ftvm.l3.channel import PACK_HEAD
    limits = standby_limits([256])

    async def packed(kind: Msg, declared: int, body: bytes) -> None:
        server, primary, standby, _ = await pair(compress=True)
        try:
            frame = zstandard.ZstdCompressor().compress(body)
            msg = encode(Msg.PACKED, PACK_HEAD.pack(kind, declared), frame)
            primary.writer.writelines([*msg, primary._tag(b"P", 0, msg)])
            await standby.receive(limits)
        finally:
            server.close()

    with pytest.raises(WireError, match="at most"):  # a bomb: refused by its declared size, never inflated
        await packed(Msg.CHECKPOINT, limits[Msg.CHECKPOINT] + 1, b"\0" * 1000)
    with pytest.raises(WireError, match="does not hold"):
        await packed(Msg.CHECKPOINT, 100, b"\0" * 100_000)  # declares less than the frame holds
    with pytest.raises(WireError, match="unexpected PACKED"):
        await packed(Msg.ACK, 8, struct.pack(">Q", 1))
    server, primary, standby, _ = await pair()  # compression not agreed: PACKED is not even read
    try:
        msg = encode(Msg.PACKED, PACK_HEAD.pack(Msg.CHECKPOINT, 3), b"abc")
        primary.writer.writelines([*msg, primary._tag(b"P", 0, msg)])
        with pytest.raises(WireError, match="unexpected PACKED"):
            await standby.receive(limits)
    finally:
        server.close()
