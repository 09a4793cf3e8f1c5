"""`ftvm agent --config host.toml`: run the host agent until SIGTERM."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import sys
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
    try:
        asyncio.run(Agent(cfg, run_as).run())
    except AgentStartError as e:
        logging.getLogger("ftvm.agent").error("%s", e)
        return 5
    return 0
