"""Health probes: their settings, when they count, and what one probe sees (core/health.py,
agent/health.py), against real loopback servers."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from ftvm.agent.health import HealthProbes, probe_once, probe_target
from ftvm.agent.local import LocalRecord
from ftvm.core.guest_failures import PROBE
from ftvm.core.health import HealthProbe, HealthTracker, paused_because, settings_problem
from ftvm.core.model import Level, NicSpec, Ownership, PoolSnapshot, RunState, VmSpec, VmView, spec_problem


@pytest.mark.parametrize("text, probe", [
    ("tcp:7000", HealthProbe("tcp", 7000)),
    ("http:8080", HealthProbe("http", 8080, "/")),
    ("http:8080/health?full=1", HealthProbe("http", 8080, "/health?full=1")),
])
def test_probes_parse_and_print_back(text: str, probe: HealthProbe) -> None:
    assert HealthProbe.parse(text) == probe
    assert HealthProbe.parse(str(probe)) == probe


@pytest.mark.parametrize("text", ["tcp", "tcp:", "tcp:0", "tcp:70000", "udp:53", "http:80health", "tcp:80/x",
                                  "http:80/a b", "http:80/\n", "TCP:80", " tcp:80"])
def test_malformed_probes_are_refused_with_the_forms_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="tcp:PORT or http:PORT/PATH|out of range"):
        HealthProbe.parse(text)


def test_settings_out_of_range_are_named() -> None:
    assert settings_problem("tcp:22", 10, 3, 3, 120) is None
    assert settings_problem("", 10, 3, 3, 120) is None
    assert "interval" in (settings_problem("tcp:22", 0.5, 0.2, 3, 0) or "")
    assert "timeout" in (settings_problem("tcp:22", 5, 6, 3, 0) or "")
    assert "failures" in (settings_problem("tcp:22", 5, 1, 0, 0) or "")
    assert "grace" in (settings_problem("tcp:22", 5, 1, 3, -1) or "")
    spec = VmSpec("web", Level.RESTART, 256, 1, (), (), health="ssh:22")
    assert "health probe" in (spec_problem(spec) or "")


def test_nothing_counts_while_moving_not_running_or_in_the_grace() -> None:
    assert paused_because(True, False, 200, 120) is None
    assert "grace" in (paused_because(True, False, 60, 120) or "")
    assert "moving" in (paused_because(True, True, 500, 120) or "")
    assert paused_because(False, False, 500, 120) == "not running"


def test_n_failures_in_a_row_give_one_verdict_and_a_success_or_pause_starts_again() -> None:
    t = HealthTracker(3)
    assert t.record("refused") is None and t.record("refused") is None
    assert t.record(None) is None  # the series is broken
    assert t.record("x") is None and t.record("x") is None
    t.pause()
    assert t.record("x") is None and t.record("x") is None
    verdict = t.record("no answer within 3 s")
    assert verdict == "3 probes in a row failed (last: no answer within 3 s)"
    assert t.in_a_row == 0 and t.record("x") is None  # counting starts again after a verdict


async def _server(handler: Any) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _http(reply: bytes) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()
    return handle


async def test_one_probe_against_real_servers() -> None:
    hung: list[asyncio.StreamWriter] = []

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # accepts, never answers: a hung service

    servers = []
    for handler in (_http(b"HTTP/1.0 200 OK\r\n\r\nok"), _http(b"HTTP/1.1 503 Busy\r\n\r\n"),
                    _http(b"SSH-2.0-x\r\n"), _http(b"HTTP/1.0 200 " + b"x" * 5000 + b"\r\n"), never):
        servers.append(await _server(handler))
    (ok, p_ok), (busy, p_busy), (ssh, p_ssh), (long, p_long), (hang, p_hang) = servers
    try:
        assert await probe_once(HealthProbe("http", p_ok, "/health"), "127.0.0.1", 2) is None
        assert await probe_once(HealthProbe("http", p_busy), "127.0.0.1", 2) == "HTTP 503"
        assert await probe_once(HealthProbe("http", p_ssh), "127.0.0.1", 2) == "not an HTTP answer"
        assert "longer than" in (await probe_once(HealthProbe("http", p_long), "127.0.0.1", 2) or "")
        assert await probe_once(HealthProbe("http", p_hang), "127.0.0.1", 0.3) == "no answer within 0.3 s"
        # a TCP probe only sees that the port accepts: the hung service passes it
        assert await probe_once(HealthProbe("tcp", p_hang), "127.0.0.1", 1) is None
        for s, _ in servers:
            s.close()
            await s.wait_closed()
        assert "refused" in (await probe_once(HealthProbe("tcp", p_ok), "127.0.0.1", 1) or "").lower()
    finally:
        for w in hung:
            w.close()
        for s, _ in servers:
            s.close()


class _Journal:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def event(self, vm: str, kind: str, message: str, at: float | None = None) -> None:
        self.events.append((vm, kind, message))


async def test_the_agent_sets_a_guest_failure_after_n_failures_and_never_while_moving() -> None:
    server, port = await _server(_http(b"HTTP/1.0 500 Broken\r\n\r\n"))
    spec = VmSpec("web", Level.RESTART, 256, 1, (), (NicSpec("52:54:00:00:00:01", "127.0.0.1/8"),),
                  # (below the 1 s a spec may ask: this VmSpec is not checked, and the test is short)
                  health=f"http:{port}/", health_interval_s=0.05, health_timeout_s=1, health_failures=2,
                  health_grace_s=0)
    rec = LocalRecord("web", 7, RunState.RUNNING)
    view = VmView(spec, owner=Ownership("h1", 7))
    woken: list[int] = []
    probes = HealthProbes({"web": rec}, _Journal(), lambda: woken.append(1))  # type: ignore[arg-type]
    try:
        # moving (a live migration): the failures never count
        probes.sync(PoolSnapshot(1, {}, {"web": view}), moving={"web"})
        task = probes.probing["web"].task
        await asyncio.sleep(0.5)
        assert rec.guest_failure is None and not woken
        # no longer moving: two failures in a row are a guest failure, and the tick is woken
        probes.sync(PoolSnapshot(2, {}, {"web": view}), moving=set())
        assert probes.probing["web"].task is task  # same settings: the same task goes on
        for _ in range(100):
            if rec.guest_failure:
                break
            await asyncio.sleep(0.05)
        assert rec.guest_failure is not None and rec.guest_failure.startswith(PROBE)
        assert "HTTP 500" in rec.guest_failure and woken
        # the probe switched off: its task ends
        probes.sync(PoolSnapshot(3, {}, {"web": replace(view, spec=replace(spec, health=""))}), moving=set())
        assert "web" not in probes.probing
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()
    finally:
        probes.close()
        server.close()
        await server.wait_closed()


def test_the_probe_goes_to_the_first_address() -> None:
    spec = VmSpec("web", Level.RESTART, 256, 1, (), (NicSpec("52:54:00:00:00:01"),
                                                      NicSpec("52:54:00:00:00:02", "10.0.0.5/24")))
    assert probe_target(spec) == "10.0.0.5"
    assert probe_target(replace(spec, nics=())) is None
