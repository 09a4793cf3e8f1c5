"""host.toml: one agent's configuration, checked completely before anything starts."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.model import valid_name
from ..core.timing import Timing, TimingError


DEFAULT_IMAGE_ROOTS = ("/var/lib/ftvm/images", "/var/cache/ftvm")


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
    image_roots: tuple[str, ...] = DEFAULT_IMAGE_ROOTS  # level 0 disks and boot files may live here too
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
          "shared_storage", "image_roots", "accel", "probe_kernel", "stop_grace", "timing", "local_storage",
          "local_format", "replication_addr", "debug_qmp", "a_links", "ram_dir", "checkpoint_port",
          "api_listen", "api_token_file", "write_through_copies"}


class _Settings:
    """Typed reads of host.toml settings; each wrong value is a ConfigError naming it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def string(self, key: str, default: str | None = None) -> str:
        v = self.data.get(key, default)
        if not isinstance(v, str) or "\x00" in v or len(v) > 4096:
            raise ConfigError(f"{key} must be a string")
        return v

    def name(self, key: str) -> str:
        v = self.data.get(key)
        if not valid_name(v):
            raise ConfigError(f"{key} {v!r} must be lowercase letters, digits and '-', starting with a letter")
        return str(v)

    def positive_int(self, key: str, default: int | None = None, most: int = 1 << 40) -> int:
        v = self.data.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= most:
            raise ConfigError(f"{key} must be a positive integer (at most {most})")
        return v

    def number(self, key: str, default: float) -> float:
        v = self.data.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 86400:
            raise ConfigError(f"{key} must be a number of seconds (0 to 86400)")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false")
        return v

    def path(self, key: str, what: str = "an absolute path") -> Path | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v.startswith("/") or "\x00" in v:
            raise ConfigError(f"{key} must be {what}")
        return Path(v)

    def paths(self, key: str) -> tuple[str, ...]:
        v = self.data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(p, str) and p.startswith("/") and "\x00" not in p
                                              for p in v):
            raise ConfigError(f"{key} must be a list of absolute paths")
        return tuple(p.rstrip("/") or "/" for p in v)

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        v = self.data.get(key, default)
        if v not in options:
            raise ConfigError(f"{key} must be {' or '.join(options)}")
        return str(v)


def parse_config(data: dict[str, Any]) -> AgentConfig:
    unknown = sorted(map(str, set(data) - _KNOWN))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    missing = [k for k in ("name", "pool", "etcd", "state_dir", "bridge", "memory_mib", "vcpus")
               if k not in data]
    if missing:
        raise ConfigError(f"missing setting(s): {', '.join(missing)}")
    c = _Settings(data)
    etcd = data["etcd"]
    if isinstance(etcd, str):
        etcd = [etcd]
    if not isinstance(etcd, list) or not etcd or not all(
            isinstance(e, str) and e.startswith(("http://", "https://")) for e in etcd):
        raise ConfigError("etcd must be a list of http(s):// endpoints")
    try:
        timing = Timing.from_dict(data.get("timing", {}))
    except TimingError as e:
        raise ConfigError(str(e)) from None
    state_dir = c.path("state_dir")
    assert state_dir is not None
    port = c.positive_int("checkpoint_port", 7410, most=65535)
    replication_addr = c.string("replication_addr", "")
    if replication_addr:
        try:
            ipaddress.ip_address(replication_addr)
        except ValueError:
            raise ConfigError(f"replication_addr {replication_addr!r} must be an IP address") from None
    api_listen, api_token = _api_settings(data)
    a_links = data.get("a_links", {})
    if not isinstance(a_links, dict) or not all(
            valid_name(peer) and isinstance(v, list) and all(isinstance(i, str) and 0 < len(i) < 16 for i in v)
            for peer, v in a_links.items()):
        raise ConfigError('a_links must map a peer host to its interface names, e.g. {h2 = ["a1-h2", "a2-h2"]}')
    bridge = c.string("bridge")
    if not 0 < len(bridge) < 16 or "/" in bridge or bridge.strip() != bridge:
        raise ConfigError(f"bridge {bridge!r} must be a network interface name")
    return AgentConfig(
        name=c.name("name"), pool=c.name("pool"), etcd=tuple(etcd), state_dir=state_dir,
        bridge=bridge, memory_mib=c.positive_int("memory_mib"), vcpus=c.positive_int("vcpus", most=4096),
        shared_storage=c.paths("shared_storage"),
        image_roots=c.paths("image_roots") if "image_roots" in data else DEFAULT_IMAGE_ROOTS,
        accel=c.choice("accel", "auto", ("auto", "kvm", "tcg")),
        probe_kernel=c.path("probe_kernel"), stop_grace=c.number("stop_grace", 0.0), timing=timing,
        local_storage=c.path("local_storage"), local_format=c.choice("local_format", "raw", ("raw", "qcow2")),
        replication_addr=replication_addr, write_through_copies=c.flag("write_through_copies", True),
        debug_qmp=c.flag("debug_qmp", False),
        a_links=tuple((peer, tuple(ifs)) for peer, ifs in sorted(a_links.items())),
        ram_dir=c.path("ram_dir", "an absolute path (a tmpfs such as /dev/shm/ftvm)"), checkpoint_port=port,
        api_listen=api_listen, api_token=api_token,
    )


def _api_settings(data: dict[str, Any]) -> tuple[tuple[str, int] | None, str]:
    listen = data.get("api_listen")
    if listen is None:
        return None, ""
    if not isinstance(listen, str):
        raise ConfigError(f"api_listen {listen!r} must be ADDRESS:PORT, e.g. 10.0.0.1:7400")
    addr, _, port = listen.rpartition(":")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"api_listen {listen!r} must be ADDRESS:PORT, e.g. 10.0.0.1:7400")
    token_file = data.get("api_token_file")
    if not token_file or not isinstance(token_file, str):
        raise ConfigError("api_listen needs api_token_file (a file holding the pool's API token)")
    try:
        token = Path(token_file).read_text().strip()
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read api_token_file {token_file}: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < 16:
        raise ConfigError(f"the API token in {token_file} is too short (at least 16 characters)")
    return (addr.strip("[]"), int(port)), token


def load_config(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
