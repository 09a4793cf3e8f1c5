"""host.toml: one agent's configuration, checked completely before anything starts."""

from __future__ import annotations

import ipaddress
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.model import valid_name
from ..core.sites import COMPRESS_WHEN
from ..core.timing import Timing, TimingError
from ..pki import TlsFiles
from ..qemu.runas import DEFAULT_USER
from ..secret import SecretError, load_secret


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
    stop_grace: float = 60.0  # seconds a guest gets to power off (ACPI) before QEMU is quit
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
    pool_secret: bytes = b""            # read from pool_secret_file (ftvm/secret.py)
    qemu_user: str = DEFAULT_USER       # QEMU and the storage daemons run as this user (qemu/runas.py)
    etcd_tls: TlsFiles | None = None    # etcd_ca, etcd_cert, etcd_key: the pool CA, our client cert
    api_tls: TlsFiles | None = None     # the API's certificate (api_cert/api_key, default the etcd one)
    api_read_token: str = ""            # read from api_read_token_file: /metrics and the dashboard only
    timing: Timing = Timing()
    l3_tracking: str = "auto"           # level 3 RAM: exact write tracking where the host allows it, or compare
    l3_warm_standby: bool = True        # level 3 partner: a QEMU started ahead on each replica (agent/warm.py)
    l3_compress: str = "between-sites"  # level 3 checkpoints compressed: to a partner at another site, always, never
    site: str = ""                      # the building or site this host stands in ("" none: core/sites.py)
    # asynchronous DR: the secret both pools hold (dr_secret_file), and on a DR pool's host
    # the address its receiver listens on ("addr:port", dr/receiver.py; replicas in local_storage/dr)
    dr_secret: bytes = b""
    dr_listen: tuple[str, int] | None = None

    @property
    def guest_ram_dir(self) -> Path:
        return self.ram_dir or Path("/dev/shm/ftvm") / self.name


_KNOWN = {"name", "pool", "etcd", "state_dir", "bridge", "memory_mib", "vcpus",
          "shared_storage", "image_roots", "accel", "probe_kernel", "stop_grace", "timing", "local_storage",
          "local_format", "replication_addr", "debug_qmp", "a_links", "ram_dir", "checkpoint_port",
          "api_listen", "api_token_file", "write_through_copies", "pool_secret_file",
          "etcd_ca", "etcd_cert", "etcd_key", "qemu_user", "api_cert", "api_key", "api_read_token_file", "l3_tracking",
          "l3_warm_standby", "l3_compress", "site", "dr_secret_file", "dr_listen"}


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
    etcd_tls = _etcd_tls(c, etcd)
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
    pool_secret = _secret(c, "pool_secret_file")
    if replication_addr and not pool_secret:
        raise ConfigError("replication_addr needs pool_secret_file: every channel between hosts is "
                          "authenticated with the pool secret (`ftvm pool init`, docs/security.md)")
    dr_secret = _secret(c, "dr_secret_file")
    dr_listen = _address(data, "dr_listen")
    if dr_listen is not None and not (dr_secret and c.path("local_storage")):
        raise ConfigError("dr_listen needs dr_secret_file (DR sessions are authenticated with it) and "
                          "local_storage (the DR replicas live there)")
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
        probe_kernel=c.path("probe_kernel"), stop_grace=c.number("stop_grace", 60.0), timing=timing,
        local_storage=c.path("local_storage"), local_format=c.choice("local_format", "raw", ("raw", "qcow2")),
        replication_addr=replication_addr, write_through_copies=c.flag("write_through_copies", True),
        debug_qmp=c.flag("debug_qmp", False),
        a_links=tuple((peer, tuple(ifs)) for peer, ifs in sorted(a_links.items())),
        ram_dir=c.path("ram_dir", "an absolute path (a tmpfs such as /dev/shm/ftvm)"), checkpoint_port=port,
        api_listen=api_listen, api_token=api_token, pool_secret=pool_secret, etcd_tls=etcd_tls,
        qemu_user=c.string("qemu_user", DEFAULT_USER),
        api_tls=_api_tls(c, etcd_tls) if api_listen else None,
        api_read_token=_read_token(data, api_token) if api_listen else "",
        l3_tracking=c.choice("l3_tracking", "auto", ("auto", "compare")),
        l3_warm_standby=c.flag("l3_warm_standby", True),
        l3_compress=c.choice("l3_compress", "between-sites", COMPRESS_WHEN),
        site=c.name("site") if "site" in data else "",
        dr_secret=dr_secret, dr_listen=dr_listen,
    )


def _read_token(data: dict[str, Any], admin: str) -> str:
    token = _token_file(data, "api_read_token_file")
    if token == admin:
        raise ConfigError("api_read_token_file holds the admin token: the read-only token must differ")
    return token


def _etcd_tls(c: _Settings, etcd: list[str]) -> TlsFiles | None:
    """https endpoints need the pool CA and this host's client certificate. Plain http is
    accepted only on the loopback address (a quorum service on this very host)."""
    files = [c.path(k) for k in ("etcd_ca", "etcd_cert", "etcd_key")]
    for e in etcd:
        if e.startswith("http://"):
            host = e[len("http://"):].split("/")[0].rsplit(":", 1)[0].strip("[]")
            if host != "localhost" and not _loopback(host):
                raise ConfigError(f"etcd endpoint {e} is plain http: the quorum service must be reached over "
                                  "https with client certificates (etcd_ca, etcd_cert, etcd_key)")
    if not any(e.startswith("https://") for e in etcd):
        return None
    if any(f is None for f in files):
        raise ConfigError("https etcd endpoints need etcd_ca, etcd_cert and etcd_key (`ftvm pool init`)")
    ca, cert, key = files
    assert ca and cert and key
    tls = TlsFiles(ca, cert, key)
    try:
        tls.client_context()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the etcd CA or client certificate: {e}") from None
    return tls


def _api_tls(c: _Settings, etcd_tls: TlsFiles | None) -> TlsFiles:
    cert, key = c.path("api_cert"), c.path("api_key")
    if cert is None and etcd_tls is not None:
        cert, key = etcd_tls.cert, etcd_tls.key
    if cert is None or key is None:
        raise ConfigError("api_listen needs api_cert and api_key (the API is served over https only)")
    tls = TlsFiles(etcd_tls.ca if etcd_tls else cert, cert, key)
    try:
        tls.server_context()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the API certificate {cert}: {e}") from None
    return tls


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_file(data: dict[str, Any], key: str) -> str:
    path = data.get(key)
    if not path or not isinstance(path, str):
        raise ConfigError(f"api_listen needs {key}")
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {key} {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < 16:
        raise ConfigError(f"the token in {path} is too short (at least 16 characters)")
    return token


def _secret(c: _Settings, key: str) -> bytes:
    """The secret in the file `key` names (b"" when the setting is absent)."""
    path = c.path(key)
    if path is None:
        return b""
    try:
        return load_secret(path)
    except SecretError as e:
        raise ConfigError(f"{key}: {e}") from None


def _address(data: dict[str, Any], key: str) -> tuple[str, int] | None:
    listen = data.get(key)
    if listen is None:
        return None
    if not isinstance(listen, str):
        raise ConfigError(f"{key} {listen!r} must be ADDRESS:PORT, e.g. 10.0.0.1:7400")
    addr, _, port = listen.rpartition(":")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} {listen!r} must be ADDRESS:PORT, e.g. 10.0.0.1:7400")
    return addr.strip("[]"), int(port)


def _api_settings(data: dict[str, Any]) -> tuple[tuple[str, int] | None, str]:
    listen = _address(data, "api_listen")
    if listen is None:
        return None, ""
    return listen, _token_file(data, "api_token_file")


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
