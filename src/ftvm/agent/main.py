"""`ftvm agent --config host.toml`: run the host agent until SIGTERM (or SIGUSR2: an upgrade)."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from .agent import Agent
from .lease import AgentStartError
from ..qemu.runas import RunAs, RunAsError
from .config import ConfigError, load_config


def run_agent(config_path: Path, verbose: bool = False) -> int:
    """Exit codes: 0 stopped cleanly, 2 bad config, 5 quorum unreachable or name taken."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load_config(config_path)
        run_as = RunAs.lookup(cfg.qemu_user)
    except (ConfigError, RunAsError) as e:
        logging.getLogger("ftvm.agent").error("%s", e)
        return 2
    if run_as is None:
        logging.getLogger("ftvm.agent").warning("qemu_user = \"root\": QEMU runs with every privilege; a guest "
                                                "that escapes it owns the host")
    faulthandler.register(signal.SIGUSR1, file=sys.stderr)  # `kill -USR1 PID`: every thread's stack
    loop = asyncio.new_event_loop()
    code = 0
    try:
        loop.run_until_complete(Agent(cfg, run_as).run())
        loop.run_until_complete(end_stray_tasks(STRAY_TASKS_S))
    except AgentStartError as e:
        logging.getLogger("ftvm.agent").error("%s", e)
        code = 5
    except BaseException:  # (a crash: its traceback, then the same hard ending)
        traceback.print_exc()
        code = 1
    # Not asyncio.run's ending, which waits without bound for every task to end and every
    # worker thread to return: the agent's work is over (VMs stopped, or left to the keepers
    # and the next agent), and a task or thread stuck then must not keep this process, its
    # state directory lock with it, from the agent that replaces it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


STRAY_TASKS_S = 5.0


async def end_stray_tasks(timeout: float) -> list[asyncio.Task[object]]:
    """Cancel every other task and give them `timeout` to end. One that does not has
    swallowed its cancellation (a bug): it is logged with where it waits, and returned."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    if not others:
        return []
    _, pending = await asyncio.wait(others, timeout=timeout)
    for task in pending:
        where = io.StringIO()
        task.print_stack(file=where)
        logging.getLogger("ftvm.agent").error("task %s did not end when cancelled:\n%s", task.get_name(),
                                              where.getvalue())
    return list(pending)
