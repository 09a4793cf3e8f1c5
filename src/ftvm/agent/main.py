"""`ftvm agent --config host.toml`: run the host agent until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .agent import Agent, AgentStartError
from .config import ConfigError, load_config


def run_agent(config_path: Path, verbose: bool = False) -> int:
    """Exit codes: 0 stopped cleanly, 2 bad config, 5 quorum unreachable or name taken."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        logging.getLogger("ftvm.agent").error("%s", e)
        return 2
    try:
        asyncio.run(Agent(cfg).run())
    except AgentStartError as e:
        logging.getLogger("ftvm.agent").error("%s", e)
        return 5
    return 0
