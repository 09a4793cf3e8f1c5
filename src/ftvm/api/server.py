"""The agent's HTTP service: the REST API (`/api/v1`, described in `openapi.json`) and the
Prometheus endpoint (`/metrics`).

Every request needs `Authorization: Bearer <token>` (the pool's API token, from the
file named by `api_token_file`); without it the answer is 401 and nothing changes.
Mutating requests answer 202 with a job (`/api/v1/jobs/<id>`) whose state and
progress can be followed: the change is recorded in the store at once, the job then
follows the agents acting on it. Errors are JSON `{"error", "code"}` with the same
outcome codes as the CLI's exit codes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from .. import ops
from ..core.model import Desired, PoolSnapshot, RunState, VmSpec
from ..errors import BAD_INPUT, HTTP_STATUS, NO_QUORUM, NOT_FOUND, REFUSED, FtvmError
from ..store.etcd import EtcdError, EtcdUnavailable
from ..store.pool import PoolStore, UnreadableRecord
from ..views import host_rows, level_progress, move_progress, row_of, status_data, vm_detail, vm_rows
from . import metrics
from .console import ConsoleContext, serve_console, serve_log, serve_trace

JOB_TIMEOUT_S = 300.0
KEEP_JOBS = 500


@dataclass
class Job:
    id: str
    kind: str
    vm: str
    state: str = "running"      # running | succeeded | failed
    progress: str = "accepted"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Jobs:
    """This agent's jobs (in memory: a job id is valid on the agent that accepted it)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def start(self, kind: str, vm: str, work: Callable[[Job], Awaitable[None]]) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind, vm)
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            self.jobs.pop(next(iter(self.jobs)))

        async def run() -> None:
            try:
                await asyncio.wait_for(work(job), JOB_TIMEOUT_S)
                job.state = "succeeded"
            except TimeoutError:
                job.state, job.error = "failed", f"not done within {JOB_TIMEOUT_S:g}s"
            except (FtvmError, EtcdError) as e:
                job.state, job.error = "failed", str(e)
            job.finished = time.time()
        asyncio.create_task(run(), name=f"job-{job.id}")
        return job


@dataclass
class ApiContext:
    """What the service needs from its agent."""

    store: PoolStore
    pool: str
    endpoints: list[str]
    token: str                # the admin token: any request
    snapshot: Callable[[], Awaitable[PoolSnapshot]]
    health: Callable[[], metrics.AgentHealth]
    counters: metrics.AgentCounters
    read_token: str = ""      # read-only: GET requests (status, /metrics, the dashboard), which change nothing
    console: ConsoleContext | None = None  # serial consoles and logs (api/console.py); None: not served


def _error(message: str, code: int) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=HTTP_STATUS.get(code, 500))


def make_app(ctx: ApiContext) -> web.Application:
    jobs = Jobs()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path == "/" and request.method == "GET":
            return await handler(request)  # the dashboard's page holds no data; its requests need the token
        given = request.headers.get("Authorization", "")
        token = given[7:].encode() if given.startswith("Bearer ") else b""
        admin = hmac.compare_digest(token, ctx.token.encode())
        reader = bool(ctx.read_token) and hmac.compare_digest(token, ctx.read_token.encode())
        if not (admin or reader):
            return web.json_response({"error": "missing or wrong API token", "code": 401}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="ftvm"'})
        if not admin and (request.method not in ("GET", "HEAD") or request.path.endswith("/console")):
            return web.json_response({"error": "the read-only token cannot change anything (a console types "
                                               "into the guest)", "code": 403}, status=403)
        try:
            return await handler(request)
        except FtvmError as e:
            return _error(str(e), e.code)
        except EtcdUnavailable as e:
            return _error(f"quorum service unreachable: {e}", NO_QUORUM)
        except UnreadableRecord as e:
            return _error(f"{e} (nothing changed)", REFUSED)
        except EtcdError as e:
            return _error(f"quorum service error: {e}", 1)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(status_data(await ctx.snapshot(), ctx.endpoints, ctx.pool))

    async def vms(_: web.Request) -> web.Response:
        snap = await ctx.snapshot()
        return web.json_response(vm_rows(snap))

    async def vm(request: web.Request) -> web.Response:
        snap, view = await ops.get_view(ctx.store, request.match_info["name"])
        return web.json_response(vm_detail(snap, view))

    async def hosts(_: web.Request) -> web.Response:
        return web.json_response(host_rows(await ctx.snapshot()))

    async def events(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
            since = int(request.query.get("since_revision", "0"))
        except ValueError:
            raise FtvmError("limit and since_revision must be integers", BAD_INPUT) from None
        evs, rev = await ctx.store.events(limit=max(1, min(limit, 10_000)), since_revision=since)
        return web.json_response({"revision": rev, "events": [e.__dict__ for e in evs]})

    async def get_metrics(_: web.Request) -> web.Response:
        text = metrics.render(await ctx.snapshot(), ctx.health(), ctx.counters)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def dashboard(_: web.Request) -> web.Response:
        page = resources.files("ftvm.api").joinpath("dashboard.html").read_text()
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                                "style-src 'unsafe-inline'; connect-src 'self'",
                                     "Cache-Control": "no-store"})

    async def openapi(_: web.Request) -> web.Response:
        text = resources.files("ftvm.api").joinpath("openapi.json").read_text()
        return web.json_response(json.loads(text))

    def accepted(job: Job, **extra: Any) -> web.Response:
        return web.json_response(job.to_json() | extra, status=202, headers={"Location": f"/api/v1/jobs/{job.id}"})

    async def add_vm(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            spec = VmSpec.from_json(body)
        except (ValueError, KeyError, TypeError) as e:
            raise FtvmError(f"the body must be a VM spec (JSON): {e}", BAD_INPUT) from None
        await ops.define(ctx.store, spec)

        async def follow(job: Job) -> None:
            job.progress = "defined"
            if spec.desired is Desired.RUNNING:
                await _wait_running(ctx, job, spec.name)
        return accepted(jobs.start("add", spec.name, follow))

    async def start_stop(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        desired = {"start": Desired.RUNNING, "stop": Desired.STOPPED}[action]
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                raise FtvmError("the body must be JSON", BAD_INPUT) from None
            if not isinstance(body, dict) or set(body) - {"accept_data_loss", "host", "force"}:
                raise FtvmError('the body may only be {"accept_data_loss": true, "host": H} (start) '
                                'or {"force": true} (stop)', BAD_INPUT)
        forced = None
        force = body.pop("force", False) if action == "stop" else False
        if force not in (True, False):
            raise FtvmError('"force" must be true or false', BAD_INPUT)
        if body.get("accept_data_loss") is True and action == "start":
            forced = await ops.force_start(ctx.store, name, body.get("host"))
        elif body:
            raise FtvmError('"host" goes with "accept_data_loss": true, on start only; "force" with stop',
                            BAD_INPUT)
        changed = await ops.set_desired(ctx.store, name, desired, force=bool(force))

        async def follow(job: Job) -> None:
            if desired is Desired.RUNNING:
                await _wait_running(ctx, job, name)
            else:
                await _wait_released(ctx, job, name)
        return accepted(jobs.start(action, name, follow), changed=changed, forced_host=forced)

    async def repair(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        host = await _body_field(request, "host")
        await ops.repair_disk(ctx.store, name, host)

        async def done(job: Job) -> None:
            job.progress = f"the copy on {host} will be resynced in full, then mirrored"
        return accepted(jobs.start("repair-disk", name, done))

    async def patch_vm(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = await request.json()
        except ValueError:
            raise FtvmError("the body must be JSON", BAD_INPUT) from None
        if not isinstance(body, dict):
            raise FtvmError("the body must be a JSON object", BAD_INPUT)
        if "level" in body:
            return await patch_level(name, body)
        await ops.patch(ctx.store, name, body)

        async def done(job: Job) -> None:
            job.progress = "recorded; the agent running the VM follows within seconds"
        return accepted(jobs.start("set", name, done))

    async def patch_level(name: str, body: dict[str, Any]) -> web.Response:
        if set(body) - {"level", "disk_paths", "overwrite"}:
            raise FtvmError("change the level (with disk_paths, overwrite) in a request of its own", BAD_INPUT)
        level, paths, overwrite = body["level"], body.get("disk_paths") or [], body.get("overwrite", False)
        if (not isinstance(level, int) or isinstance(level, bool) or not isinstance(paths, list)
                or not all(isinstance(p, str) for p in paths) or not isinstance(overwrite, bool)):
            raise FtvmError("level must be an integer, disk_paths a list of paths, overwrite true or false",
                            BAD_INPUT)
        previous, online = await ops.change_level(ctx.store, name, level, tuple(paths), overwrite)

        async def follow(job: Job) -> None:
            while True:
                state, frac, detail = level_progress(row_of(await ctx.snapshot(), name), level)
                job.progress = f"{detail} ({int(100 * frac)}%)"
                if state == "done":
                    return
                if state == "failed":
                    raise FtvmError(detail)
                await asyncio.sleep(0.3)
        return accepted(jobs.start("level", name, follow), previous_level=previous, online=online)

    async def delete_vm(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await ops.remove(ctx.store, name)

        async def done(job: Job) -> None:
            job.progress = "removed (disk images are kept)"
        return accepted(jobs.start("remove", name, done))

    async def availability(request: web.Request) -> web.Response:
        try:
            days = float(request.query.get("days", "30"))
        except ValueError:
            raise FtvmError("days must be a number", BAD_INPUT) from None
        if days <= 0:
            raise FtvmError("days must be positive", BAD_INPUT)
        name = request.match_info.get("name")
        end = time.time()
        reports = await ops.availability(ctx.store, end - days * 86400, end, [name] if name else None)
        return web.json_response({"days": days, "reports": [r.to_json() for r in reports]})

    async def migrate_vm(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        target = await _body_field(request, "to")
        m = await ops.migrate(ctx.store, name, target)

        async def follow(job: Job) -> None:
            await _wait_moved(ctx, job, {name: m.to})
        return accepted(jobs.start("migrate", name, follow), **{"from": m.source, "to": m.to})

    async def maintenance(request: web.Request) -> web.Response:
        host, action = request.match_info["host"], request.match_info["action"]
        if action == "resume":
            await ops.end_maintenance(ctx.store, host)

            async def resumed(job: Job) -> None:
                job.progress = f"{host} back in service"
            return accepted(jobs.start("resume", host, resumed))
        reason = "maintenance (API)"
        if request.can_read_body:
            try:
                reason = str((await request.json()).get("reason") or reason)
            except (ValueError, AttributeError):
                raise FtvmError('the body may only be {"reason": TEXT}', BAD_INPUT) from None
        moves = await ops.start_maintenance(ctx.store, host, reason)

        async def follow(job: Job) -> None:
            await _wait_moved(ctx, job, moves)
        return accepted(jobs.start("maintenance", host, follow), moves=moves)

    async def dr_targets(request: web.Request) -> web.Response:
        snap = await ctx.snapshot()
        return web.json_response({"targets": [t.to_json() for t in snap.dr_targets.values()]})

    async def dr_replicas(request: web.Request) -> web.Response:
        snap = await ctx.snapshot()
        return web.json_response({"replicas": [r.to_json() for _, r in sorted(snap.dr_replicas.items())]})

    async def dr_test(request: web.Request) -> web.Response:
        pool, vm = request.match_info["pool"], request.match_info["vm"]
        if request.method == "DELETE":
            test = await ops.dr_test_end(ctx.store, vm, pool)
            return web.json_response({"ended": test.test_vm})
        point = None
        if request.can_read_body:
            try:
                point = (await request.json()).get("point")
            except (ValueError, AttributeError):
                raise FtvmError('the body may only be {"point": N}', BAD_INPUT) from None
            if point is not None and (not isinstance(point, int) or isinstance(point, bool)):
                raise FtvmError("point must be an integer", BAD_INPUT)
        test = await ops.dr_test(ctx.store, vm, pool, point)
        return web.json_response(test.__dict__)

    async def dr_failover(request: web.Request) -> web.Response:
        pool, vm = request.match_info["pool"], request.match_info["vm"]
        body: Any = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = None
        if not isinstance(body, dict) or set(body) - {"point", "accept_data_loss", "level"}:
            raise FtvmError('the body may only be {"point": N, "accept_data_loss": true, "level": N}', BAD_INPUT)
        point, accept, level = body.get("point"), body.get("accept_data_loss", False), body.get("level", 0)
        if not isinstance(level, int) or isinstance(level, bool):
            raise FtvmError("level must be an integer", BAD_INPUT)
        if point is not None and (not isinstance(point, int) or isinstance(point, bool)):
            raise FtvmError("point must be an integer", BAD_INPUT)
        if not isinstance(accept, bool):
            raise FtvmError("accept_data_loss must be true or false", BAD_INPUT)
        failover = await ops.dr_failover(ctx.store, vm, pool, point, accept, level)
        return web.json_response(failover.__dict__)

    async def dr_failback(request: web.Request) -> web.Response:
        pool, vm = request.match_info["pool"], request.match_info["vm"]
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = None
        if not isinstance(body, dict) or set(body) - {"target", "rpo_s", "switch"}:
            raise FtvmError('the body may only be {"target": NAME, "rpo_s": N} or {"switch": true}', BAD_INPUT)
        target, rpo, switch = body.get("target", ""), body.get("rpo_s", 9.0), body.get("switch", False)
        if (not isinstance(target, str) or not isinstance(switch, bool) or isinstance(rpo, bool)
                or not isinstance(rpo, (int, float))):
            raise FtvmError("target must be a name, rpo_s a number, switch true or false", BAD_INPUT)
        failover = await ops.dr_failback(ctx.store, vm, pool, target, float(rpo), switch)
        return web.json_response(failover.__dict__)

    async def put_dr_target(request: web.Request) -> web.Response:
        try:
            receivers = (await request.json())["receivers"]
        except (ValueError, KeyError, TypeError):
            raise FtvmError('the body must be {"receivers": ["ADDR:PORT", ...]}', BAD_INPUT) from None
        target = await ops.set_dr_target(ctx.store, request.match_info["name"], receivers)
        return web.json_response(target.to_json())

    async def delete_dr_target(request: web.Request) -> web.Response:
        await ops.remove_dr_target(ctx.store, request.match_info["name"])
        return web.json_response({"removed": request.match_info["name"]})

    def consoles() -> ConsoleContext:
        if ctx.console is None:
            raise FtvmError("this agent serves no consoles", REFUSED)
        return ctx.console

    async def vm_log(request: web.Request) -> web.Response:
        return await serve_log(request, consoles(), await ctx.snapshot())

    async def vm_console(request: web.Request) -> web.StreamResponse:
        return await serve_console(request, consoles(), await ctx.snapshot())

    async def vm_write_trace(request: web.Request) -> web.Response:
        return await serve_trace(request, consoles(), await ctx.snapshot())

    async def get_job(request: web.Request) -> web.Response:
        job = jobs.jobs.get(request.match_info["id"])
        if job is None:
            raise FtvmError(f"unknown job {request.match_info['id']!r} (jobs live on the agent that "
                            "accepted them)", NOT_FOUND)
        return web.json_response(job.to_json())

    app = web.Application(middlewares=[guard])
    app.add_routes([
        web.get("/", dashboard),
        web.get("/metrics", get_metrics),
        web.get("/api/v1/openapi.json", openapi),
        web.get("/api/v1/status", status),
        web.get("/api/v1/hosts", hosts),
        web.get("/api/v1/vms", vms),
        web.post("/api/v1/vms", add_vm),
        web.get("/api/v1/vms/{name}", vm),
        web.patch("/api/v1/vms/{name}", patch_vm),
        web.delete("/api/v1/vms/{name}", delete_vm),
        web.post("/api/v1/vms/{name}/{action:start|stop}", start_stop),
        web.post("/api/v1/vms/{name}/migrate", migrate_vm),
        web.post("/api/v1/vms/{name}/repair-disk", repair),
        web.get("/api/v1/vms/{name}/log", vm_log),
        web.get("/api/v1/vms/{name}/console", vm_console),
        web.get("/api/v1/vms/{name}/write-trace", vm_write_trace),
        web.post("/api/v1/hosts/{host}/{action:maintenance|resume}", maintenance),
        web.get("/api/v1/events", events),
        web.get("/api/v1/availability", availability),
        web.get("/api/v1/vms/{name}/availability", availability),
        web.get("/api/v1/jobs/{id}", get_job),
        web.get("/api/v1/dr-targets", dr_targets),
        web.get("/api/v1/dr-replicas", dr_replicas),
        web.post("/api/v1/dr-replicas/{pool}/{vm}/test", dr_test),
        web.delete("/api/v1/dr-replicas/{pool}/{vm}/test", dr_test),
        web.post("/api/v1/dr-replicas/{pool}/{vm}/failover", dr_failover),
        web.post("/api/v1/dr-replicas/{pool}/{vm}/failback", dr_failback),
        web.put("/api/v1/dr-targets/{name}", put_dr_target),
        web.delete("/api/v1/dr-targets/{name}", delete_dr_target),
    ])
    return app


async def _wait_running(ctx: ApiContext, job: Job, name: str) -> None:
    while True:
        _, view = await ops.get_view(ctx.store, name)
        state = view.status.state if view.status else None
        job.progress = (f"{state.value} on {view.owner.host}" if state and view.owner
                        else "waiting for a host to claim it")
        if state is RunState.RUNNING:
            return
        await asyncio.sleep(0.3)


async def _wait_released(ctx: ApiContext, job: Job, name: str) -> None:
    while True:
        _, view = await ops.get_view(ctx.store, name)
        if view.owner is None:
            job.progress = "stopped"
            return
        job.progress = f"stopping on {view.owner.host}"
        await asyncio.sleep(0.3)


async def _body_field(request: web.Request, key: str) -> str:
    """The one field a request's JSON body must carry (a host name)."""
    try:
        return str((await request.json())[key])
    except (ValueError, KeyError, TypeError):
        raise FtvmError(f'the body must be {{"{key}": HOST}}', BAD_INPUT) from None


async def _wait_moved(ctx: ApiContext, job: Job, moves: dict[str, str]) -> None:
    """Follow live migrations until every VM runs on its target (or stayed: failed)."""
    while True:
        snap = await ctx.snapshot()
        left, failed, parts = [], [], []
        for vm, to in moves.items():
            state, sent = move_progress(row_of(snap, vm), to)
            if state == "failed":
                failed.append(vm)
            elif state == "arrived":
                parts.append(f"{vm} on {to}")
            else:
                left.append(vm)
                parts.append(f"{vm} -> {to}" + (f" {int(100 * sent)}%" if sent else ""))
        job.progress = ", ".join(parts) or "no VMs to move"
        if failed:
            raise FtvmError(f"did not move: {', '.join(failed)} (see the events)")
        if not left:
            return
        await asyncio.sleep(0.3)


async def serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None) -> web.AppRunner:
    """`tls` None only in tests on the loopback address: the agent always serves https."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner
