"""host.toml: one agent's configuration, checked completely before anything starts."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.model import NAME_RE
from ..core.timing import Timing, TimingError


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class AgentConfig:
    name: str
    pool: str
    etcd: tuple[str, ...]
    state_dir: Path
    bridge: str
    memory_mib: int
    vcpus: int
    shared_storage: tuple[str, ...]
    accel: str = "auto"
    probe_kernel: Path | None = None
    stop_grace: float = 0.0
    local_storage: Path | None = None   # level 2 copies live here
    local_format: str = "raw"           # raw or qcow2, per host
    replication_addr: str = ""          # serves level 2 copies on this address (A-links)
    write_through_copies: bool = True   # level 2 copies written synchronously (qemu/writethrough.py)
    debug_qmp: bool = False             # a second QMP socket per VM, for lab fault injection
    a_links: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (peer host, its A-link interfaces here)
    ram_dir: Path | None = None         # level 3 guest RAM files (default /dev/shm/ftvm/<name>)
    checkpoint_port: int = 7410         # level 3 checkpoint stream, on replication_addr
    api_listen: tuple[str, int] | None = None  # REST API + /metrics ("addr:port"); off if unset
    api_token: str = ""                 # read from api_token_file
    timing: Timing = Timing()

    @property
    def guest_ram_dir(self) -> Path:
        return self.ram_dir or Path("/dev/shm/ftvm") / self.name


_KNOWN = {"name", "pool", "etcd", "state_dir", "bridge", "memory_mib", "vcpus",
          "shared_storage", "accel", "probe_kernel", "stop_grace", "timing", "local_storage",
          "local_format", "replication_addr", "debug_qmp", "a_links", "ram_dir", "checkpoint_port",
          "api_listen", "api_token_file", "write_through_copies"}


def parse_config(data: dict[str, Any]) -> AgentConfig:
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    missing = [k for k in ("name", "pool", "etcd", "state_dir", "bridge", "memory_mib", "vcpus")
               if k not in data]
    if missing:
        raise ConfigError(f"missing setting(s): {', '.join(missing)}")
    for key in ("name", "pool"):
        if not isinstance(data[key], str) or not NAME_RE.match(data[key]):
            raise ConfigError(f"{key} {data[key]!r} must be lowercase letters, digits and '-', "
                              "starting with a letter")
    etcd = data["etcd"]
    if isinstance(etcd, str):
        etcd = [etcd]
    if not etcd or not all(isinstance(e, str) and e.startswith(("http://", "https://")) for e in etcd):
        raise ConfigError("etcd must be a list of http(s):// endpoints")
    for key in ("memory_mib", "vcpus"):
        if not isinstance(data[key], int) or data[key] <= 0:
            raise ConfigError(f"{key} must be a positive integer")
    if data.get("accel", "auto") not in ("auto", "kvm", "tcg"):
        raise ConfigError("accel must be auto, kvm or tcg")
    try:
        timing = Timing.from_dict(data.get("timing", {}))
    except TimingError as e:
        raise ConfigError(str(e)) from None
    shared = data.get("shared_storage", [])
    if not all(isinstance(p, str) and p.startswith("/") for p in shared):
        raise ConfigError("shared_storage must be a list of absolute paths")
    if data.get("local_format", "raw") not in ("raw", "qcow2"):
        raise ConfigError("local_format must be raw or qcow2")
    local = data.get("local_storage")
    if local is not None and not (isinstance(local, str) and local.startswith("/")):
        raise ConfigError("local_storage must be an absolute path")
    ram_dir = data.get("ram_dir")
    if ram_dir is not None and not (isinstance(ram_dir, str) and ram_dir.startswith("/")):
        raise ConfigError("ram_dir must be an absolute path (a tmpfs such as /dev/shm/ftvm)")
    port = data.get("checkpoint_port", 7410)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError("checkpoint_port must be a TCP port number")
    write_through = data.get("write_through_copies", True)
    if not isinstance(write_through, bool):
        raise ConfigError("write_through_copies must be true or false")
    api_listen, api_token = _api_settings(data)
    a_links = data.get("a_links", {})
    if not isinstance(a_links, dict) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in a_links.values()):
        raise ConfigError('a_links must map a peer host to its interface names, e.g. {h2 = ["a1-h2", "a2-h2"]}')
    return AgentConfig(
        name=data["name"], pool=data["pool"], etcd=tuple(etcd), state_dir=Path(data["state_dir"]),
        bridge=data["bridge"], memory_mib=data["memory_mib"], vcpus=data["vcpus"],
        shared_storage=tuple(p.rstrip("/") for p in shared), accel=data.get("accel", "auto"),
        probe_kernel=Path(data["probe_kernel"]) if data.get("probe_kernel") else None,
        stop_grace=float(data.get("stop_grace", 0.0)), timing=timing,
        local_storage=Path(local) if local else None, local_format=data.get("local_format", "raw"),
        replication_addr=data.get("replication_addr", ""), write_through_copies=write_through,
        debug_qmp=bool(data.get("debug_qmp", False)),
        a_links=tuple((peer, tuple(ifs)) for peer, ifs in sorted(a_links.items())),
        ram_dir=Path(ram_dir) if ram_dir else None, checkpoint_port=port,
        api_listen=api_listen, api_token=api_token,
    )


def _api_settings(data: dict[str, Any]) -> tuple[tuple[str, int] | None, str]:
    listen = data.get("api_listen")
    if listen is None:
        return None, ""
    addr, _, port = str(listen).rpartition(":")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"api_listen {listen!r} must be ADDRESS:PORT, e.g. 10.0.0.1:7400")
    token_file = data.get("api_token_file")
    if not token_file:
        raise ConfigError("api_listen needs api_token_file (a file holding the pool's API token)")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read api_token_file {token_file}: {e.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"the API token in {token_file} is too short (at least 16 characters)")
    return (addr.strip("[]"), int(port)), token


def load_config(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
