"""`ftvm vm migrate`, `ftvm host maintenance`, `ftvm host resume`: moving running VMs live."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..views import move_progress
from .client import PoolClient, pool_client
from .common import FAILED, OK, console, emit_json, is_json


def _follow(client: PoolClient, moves: dict[str, str], timeout: float, show: bool) -> dict[str, dict[str, Any]]:
    """Wait until every VM runs on its target; a progress bar per VM (bytes of RAM sent)."""
    results: dict[str, dict[str, Any]] = {vm: {"to": to, "done": False} for vm, to in moves.items()}
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, disable=not show, transient=False) as progress:
        tasks = {vm: progress.add_task(f"{vm} -> {to}", total=100) for vm, to in moves.items()}
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            rows = {r["name"]: r for r in client.vms()}
            for vm, to in moves.items():
                r = results[vm]
                if r["done"]:
                    continue
                state, sent = move_progress(rows.get(vm), to)
                if state == "arrived":
                    r.update(done=True, seconds=round(time.monotonic() - t0, 2))
                    progress.update(tasks[vm], completed=100)
                elif state == "failed":
                    r.update(done=True, failed=True)
                else:
                    progress.update(tasks[vm], completed=90 * sent)
            if all(r["done"] for r in results.values()):
                break
            time.sleep(0.2)
    return results


def _report(args: Any, results: dict[str, dict[str, Any]], extra: dict[str, Any]) -> int:
    failed = [vm for vm, r in results.items() if r.get("failed") or not r["done"]]
    if is_json(args):
        emit_json(extra | {"moves": results})
    for vm in failed:
        console.print(f"[red]{vm} did not move to {results[vm]['to']}[/] (see `ftvm events`)", highlight=False)
    return FAILED if failed else OK


def cmd_vm_migrate(args: Any) -> int:
    client = pool_client(args)
    source = client.migrate(args.name, args.to)
    if not is_json(args):
        console.print(f"VM {args.name}: live migration {source} -> {args.to} requested")
    if not args.wait:
        if is_json(args):
            emit_json({"vm": args.name, "from": source, "to": args.to, "requested": True})
        return OK
    results = _follow(client, {args.name: args.to}, args.timeout, not is_json(args))
    return _report(args, results, {"vm": args.name, "from": source})


def cmd_host_maintenance(args: Any) -> int:
    client = pool_client(args)
    moves = client.start_maintenance(args.host, args.reason)
    if not is_json(args):
        console.print(f"host {args.host} in maintenance: nothing will be placed on it; moving "
                      + (", ".join(f"{vm} -> {to}" for vm, to in moves.items()) or "no VMs"))
    if not args.wait or not moves:
        if is_json(args):
            emit_json({"host": args.host, "maintenance": True, "moves": moves})
        return OK
    results = _follow(client, moves, args.timeout, not is_json(args))
    return _report(args, results, {"host": args.host, "maintenance": True})


def cmd_host_resume(args: Any) -> int:
    pool_client(args).end_maintenance(args.host)
    if is_json(args):
        emit_json({"host": args.host, "maintenance": False})
    else:
        console.print(f"host {args.host} is back in service; VMs that prefer it and have failback on move back "
                      "live (level 2-3: once their copy there is current)")
    return OK
