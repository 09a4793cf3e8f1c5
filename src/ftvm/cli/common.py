"""What every CLI command shares: exit codes, errors, output and the store connection."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from ..store.etcd import EtcdClient, EtcdError, EtcdUnavailable
from ..store.pool import PoolStore, UnreadableRecord

# Stable exit codes (documented in the README).
from ..errors import BAD_INPUT, FAILED, NO_QUORUM, NOT_FOUND, OK, REFUSED, FtvmError  # noqa: F401

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)


CliError = FtvmError  # the CLI's errors are the shared ones: exit code = outcome code


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _lab_state(args: Any) -> Any:
    from ..lab.lab import DEFAULT_DIR, LabError, load_state
    try:
        return load_state(Path(getattr(args, "lab_dir", None) or DEFAULT_DIR))
    except LabError:
        return None


def pool_ca(args: Any) -> Path | None:
    """The pool CA that verifies etcd and the agents' APIs: --ca, FTVM_CA, or the lab's."""
    given = getattr(args, "ca", None) or os.environ.get("FTVM_CA")
    if given:
        return Path(given)
    state = _lab_state(args)
    return state.pki_dir / "ca.crt" if state is not None else None


def etcd_tls(args: Any) -> ssl.SSLContext | None:
    """For https endpoints: the pool CA and a client certificate (--etcd-cert / FTVM_ETCD_CERT,
    its key beside it as .key; in the lab, the admin certificate)."""
    from ..pki import TlsFiles
    cert = getattr(args, "etcd_cert", None) or os.environ.get("FTVM_ETCD_CERT")
    explicit = getattr(args, "etcd", None) or os.environ.get("FTVM_ETCD")
    state = None if explicit else _lab_state(args)
    if state is not None:
        files = state.etcd_tls
    else:
        ca = pool_ca(args)
        if ca is None:
            return None
        files = TlsFiles(ca, Path(cert) if cert else None, Path(cert).with_suffix(".key") if cert else None)
    try:
        return files.client_context()
    except (OSError, ssl.SSLError) as e:
        raise CliError(f"cannot load the pool CA or the etcd client certificate: {e}", BAD_INPUT) from None


def endpoints(args: Any) -> tuple[list[str], str]:
    """etcd endpoints and pool name: --etcd/--pool, then FTVM_ETCD/FTVM_POOL, then the lab."""
    pool = getattr(args, "pool", None) or os.environ.get("FTVM_POOL")
    etcd = getattr(args, "etcd", None) or os.environ.get("FTVM_ETCD")
    if etcd:
        return etcd.split(","), pool or "lab"
    from ..lab.lab import DEFAULT_DIR, POOL, LabError, load_state
    try:
        state = load_state(Path(getattr(args, "lab_dir", None) or DEFAULT_DIR))
    except LabError:
        raise CliError("no quorum service given: use --etcd URL (or FTVM_ETCD), or bring up a lab "
                       "with `ftvm lab up`", BAD_INPUT) from None
    return [state.etcd_endpoint], pool or POOL


def with_store(args: Any, fn: Callable[[PoolStore], Awaitable[T]]) -> T:
    urls, pool = endpoints(args)

    async def run() -> T:
        try:
            client = EtcdClient(urls, timeout=2.0, tls=etcd_tls(args))
        except ValueError as e:
            raise CliError(f"{e}: give --ca and --etcd-cert (or FTVM_CA, FTVM_ETCD_CERT)", BAD_INPUT) from None
        async with client:
            return await fn(PoolStore(client, pool))

    try:
        return asyncio.run(run())
    except EtcdUnavailable as e:
        raise CliError(f"quorum service unreachable: {e}", NO_QUORUM) from None
    except UnreadableRecord as e:
        raise CliError(f"{e} (nothing changed)", REFUSED) from None
    except EtcdError as e:
        raise CliError(f"quorum service error: {e}", FAILED) from None


def fail(message: str, code: int) -> int:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return code


def main_guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except CliError as e:
        return fail(str(e), e.code)
    except KeyboardInterrupt:
        return fail("interrupted", FAILED)


def is_json(args: Any) -> bool:
    return getattr(args, "output", "table") == "json"


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
