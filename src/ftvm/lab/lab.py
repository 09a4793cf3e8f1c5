"""The lab: a whole ftvm pool on one machine, in network namespaces.

State lives in <lab dir>/lab.json so that later commands (fail-host, down,
status) act on the lab an earlier command built. `down` needs no state at
all: it removes every ftvm-* namespace and what runs in it, so it also
cleans up after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.timing import Timing
from ..guest.build import default_cache_dir
from ..pki import TlsFiles, init_pool
from ..secret import make_secret
from ..store.etcd import EtcdClient, EtcdError
from . import topology as topo

DEFAULT_DIR = Path(os.environ.get("FTVM_LAB_DIR", "/var/lib/ftvm/lab"))
LAB_PARTNER_REPLACE_AFTER = 8.0  # seconds: lab pools replace a lost level 2/3 partner quickly
POOL = "lab"
DR_POOL = "dr"    # `lab up --dr`: the DR site's pool


class LabError(RuntimeError):
    pass


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ns_ip(ns: str, *args: str, check: bool = True) -> None:
    sh("ip", "-n", ns, *args, check=check)


def ns_pids(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def existing_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(topo.PREFIX)]


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL everything in a lab namespace (only ever our own processes) and wait."""
    for _ in range(50):
        pids = ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise LabError(f"processes in {ns} would not die: {ns_pids(ns)}")


@dataclass
class LabState:
    dir: str
    hosts: list[str]
    timing: dict[str, float]
    host_memory_mib: int
    host_vcpus: int
    failed: list[str] = field(default_factory=list)
    partitions: list[list[str]] = field(default_factory=list)  # [host, "quorum"|"lan"|other host]
    sites: dict[str, str] = field(default_factory=dict)         # host -> site (`lab up --sites 2`)
    sites_cut: bool = False                                     # every A-link between the sites down
    metro: list[float] = field(default_factory=lambda: [0.0, 0.0])  # between the sites: RTT ms, rate Mbit/s (0: none)
    pids: dict[str, int] = field(default_factory=dict)          # etcd (member 1), etcd-mN, agent-hN
    etcd_members: int = 1                                       # `lab up --etcd-members 3`
    dr_hosts: list[str] = field(default_factory=list)           # `lab up --dr`: the DR pool's hosts
    wan: list[float] = field(default_factory=lambda: [0.0, 0.0])  # to the DR site: RTT ms, rate Mbit/s (0: none)

    @property
    def path(self) -> Path:
        return Path(self.dir) / "lab.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.rename(self.path)

    @property
    def etcd_endpoint(self) -> str:
        return f"https://{topo.ETCD_ADDR}:{topo.ETCD_PORT}"

    @property
    def etcd_endpoints(self) -> list[str]:
        """Every member's client URL (the first is `etcd_endpoint`)."""
        return [f"https://{a}:{topo.ETCD_PORT}" for a in topo.ETCD_MEMBER_ADDRS[:self.etcd_members]]

    @property
    def dr_etcd_endpoint(self) -> str:
        return f"https://{topo.DR_ETCD_ADDR}:{topo.ETCD_PORT}"

    @property
    def dr_pki_dir(self) -> Path:
        """The DR pool's own CA, certificates and tokens (it shares only the DR secret)."""
        return Path(self.dir) / "pki-dr"

    def pool_of(self, host: str) -> str:
        return DR_POOL if host in self.dr_hosts else POOL

    def pki_of(self, host: str) -> Path:
        return self.dr_pki_dir if host in self.dr_hosts else self.pki_dir

    @property
    def all_hosts(self) -> list[str]:
        return self.hosts + self.dr_hosts

    @property
    def shared_dir(self) -> Path:
        return Path(self.dir) / "shared"

    @property
    def pki_dir(self) -> Path:
        """What `ftvm pool init` makes for a pool (pki.py): CA, certificates, secret, tokens."""
        return Path(self.dir) / "pki"

    @property
    def pool_secret_file(self) -> Path:
        return self.pki_dir / "pool.secret"

    @property
    def dr_secret_file(self) -> Path:
        """The DR pairing secret (host.toml dr_secret_file), which a DR pool would share."""
        return self.pki_dir / "dr.secret"

    @property
    def api_token_file(self) -> Path:
        """The pool's API admin token (made at `lab up`, readable by root only)."""
        return self.pki_dir / "api-token"

    @property
    def api_read_token_file(self) -> Path:
        return self.pki_dir / "api-read-token"

    @property
    def etcd_tls(self) -> TlsFiles:
        """The CLI's and the tests' way into the lab's etcd: the pool CA and the admin certificate."""
        return TlsFiles(self.pki_dir / "ca.crt", self.pki_dir / "admin.crt", self.pki_dir / "admin.key")

    def etcd_client(self, timeout: float = 2.0, dr: bool = False) -> EtcdClient:
        """The main pool's etcd, or (`dr`) the DR pool's."""
        pki = self.dr_pki_dir if dr else self.pki_dir
        tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        return EtcdClient([self.dr_etcd_endpoint] if dr else self.etcd_endpoints, timeout=timeout,
                          tls=tls.client_context())

    def https(self, dr: bool = False) -> ssl.SSLContext:
        """For urllib/httpx calls to the agents' APIs: verifies them against the pool CA."""
        return TlsFiles((self.dr_pki_dir if dr else self.pki_dir) / "ca.crt").client_context()

    def api_url(self, host: str) -> str:
        """A host agent's REST API, reached from the root namespace over the management link."""
        return f"https://{topo.host_quorum_addr(host).split('/')[0]}:{topo.API_PORT}"

    def host_dir(self, host: str) -> Path:
        return Path(self.dir) / host


def load_state(lab_dir: Path = DEFAULT_DIR) -> LabState:
    path = lab_dir / "lab.json"
    if not path.exists():
        raise LabError(f"no lab is up (no {path}); run: ftvm lab up")
    return LabState(**json.loads(path.read_text()))


# --- building --------------------------------------------------------------------

def _veth(ns_a: str, if_a: str, ns_b: str | None, if_b: str) -> None:
    """A veth pair with one end in each namespace (ns None = root namespace)."""
    tmp_a, tmp_b = f"ftvt{os.getpid() % 10000}a", f"ftvt{os.getpid() % 10000}b"
    sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
    sh("ip", "link", "set", tmp_a, "netns", ns_a, "name", if_a)
    if ns_b is None:
        sh("ip", "link", "set", tmp_b, "name", if_b)
    else:
        sh("ip", "link", "set", tmp_b, "netns", ns_b, "name", if_b)


def _bridge(ns: str, name: str, addr: str | None = None) -> None:
    ns_ip(ns, "link", "add", name, "type", "bridge")
    # No STP and no forwarding delay: a port forwards the moment it is up.
    ns_ip(ns, "link", "set", name, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    if addr:
        ns_ip(ns, "addr", "add", addr, "dev", name)
    ns_ip(ns, "link", "set", name, "up")


def _new_ns(ns: str) -> None:
    sh("ip", "netns", "add", ns)
    ns_ip(ns, "link", "set", "lo", "up")


def up(n_hosts: int, lab_dir: Path = DEFAULT_DIR, timing: Timing | None = None,
       host_memory_mib: int = 2048, host_vcpus: int = 4, probe_kernel: str | None = None,
       l3_compare_hosts: tuple[str, ...] = (), l3_cold_hosts: tuple[str, ...] = (), sites: int = 0,
       dr: bool = False, etcd_members: int = 1) -> LabState:
    """`l3_compare_hosts`: hosts whose level 3 engine compares pages instead of tracking
    writes (host.toml `l3_tracking = "compare"`), to measure both side by side.
    `l3_cold_hosts`: hosts that start a level 3 partner's QEMU only at the takeover
    (`l3_warm_standby = false`), likewise. `sites` 2: the hosts stand at two sites (host.toml
    `site`), the quorum service at a third (its namespace: the witness). `etcd_members` 3:
    the quorum service is an etcd cluster of three members (on one quorum network), so one
    can fail and the quorum stays."""
    if etcd_members not in (1, 3):
        raise LabError("the lab's etcd has 1 member or 3")
    if not 2 <= n_hosts <= 4:
        raise LabError("a lab has 2 to 4 hosts")
    if sites not in (0, 2):
        raise LabError("a lab has no sites or 2 (the quorum service stands at a third)")
    if existing_namespaces() or (lab_dir / "lab.json").exists():
        raise LabError("a lab is already up (or left over): run `ftvm lab down` first")
    for tool in ("ip", "etcd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: run the install step from the README")
    timing = timing or Timing(partner_replace_after=LAB_PARTNER_REPLACE_AFTER)
    timing.check()
    hosts = topo.host_names(n_hosts)
    lab_dir.mkdir(parents=True, exist_ok=True)
    _traversable(lab_dir)
    state = LabState(dir=str(lab_dir), hosts=hosts, timing=asdict(timing),
                     host_memory_mib=host_memory_mib, host_vcpus=host_vcpus, sites=topo.host_sites(hosts, sites),
                     dr_hosts=list(topo.DR_HOSTS) if dr else [], etcd_members=etcd_members)
    state.save()
    try:
        _build_network(hosts, state.sites)
        for addr in topo.ETCD_MEMBER_ADDRS[1:etcd_members]:
            ns_ip(topo.QUORUM_NS, "addr", "add", f"{addr}/24", "dev", "qbr")
        if state.sites:
            _start_metro(state)
        if dr:
            _build_dr_site(state)
        state.shared_dir.mkdir(exist_ok=True)
        if dr:
            (state.shared_dir / "dr").mkdir(exist_ok=True)  # (the DR pool's own shared storage)
        if not state.pki_dir.exists():  # what `ftvm pool init` makes; the lab's hosts share one copy
            init_pool(state.pki_dir, POOL, [*topo.ETCD_MEMBER_ADDRS, "127.0.0.1"],
                      {h: topo.host_quorum_addr(h).split("/")[0] for h in hosts})
        if not state.dr_secret_file.exists():  # DR pairing: every lab host can ship and receive
            make_secret(state.dr_secret_file)
        _start_etcd(state)
        if dr:
            init_pool(state.dr_pki_dir, DR_POOL, [topo.DR_ETCD_ADDR, "127.0.0.1"],
                      {h: topo.host_quorum_addr(h).split("/")[0] for h in state.dr_hosts})
            _start_etcd(state, dr=True)
        for h in state.all_hosts:
            _write_host_config(state, h, probe_kernel, compare=h in l3_compare_hosts, cold=h in l3_cold_hosts)
            start_agent(state, h)
        state.save()
        wait_for_hosts(state, hosts, timeout=30)
        if dr:
            wait_for_hosts(state, state.dr_hosts, timeout=30)
    except BaseException:
        down(lab_dir)
        raise
    return state


def _build_network(hosts: list[str], sites: dict[str, str]) -> None:
    """`sites`: the A-links between hosts at different sites pass through the metro namespace,
    where `_start_metro` forwards them with a delay and a rate."""
    for ns in (topo.LAN_NS, topo.QUORUM_NS, topo.CLIENT_NS, *map(topo.host_ns, hosts)):
        _new_ns(ns)
    if sites:
        _new_ns(topo.METRO_NS)
    _bridge(topo.LAN_NS, "lan")
    _bridge(topo.QUORUM_NS, "qbr", f"{topo.ETCD_ADDR}/24")
    # management link: the CLI in the root namespace reaches etcd
    _veth(topo.QUORUM_NS, "mgmt", None, topo.MGMT_IF)
    ns_ip(topo.QUORUM_NS, "link", "set", "mgmt", "master", "qbr", "up")
    sh("ip", "addr", "add", topo.MGMT_ADDR, "dev", topo.MGMT_IF)
    sh("ip", "link", "set", topo.MGMT_IF, "up")
    # client
    _veth(topo.CLIENT_NS, "eth0", topo.LAN_NS, "client")
    ns_ip(topo.LAN_NS, "link", "set", "client", "master", "lan", "up")
    ns_ip(topo.CLIENT_NS, "addr", "add", topo.CLIENT_ADDR, "dev", "eth0")
    ns_ip(topo.CLIENT_NS, "link", "set", "eth0", "up")
    for h in hosts:
        _attach_host(h, topo.LAN_NS, topo.QUORUM_NS)
    _a_links(hosts, sites)


def _a_links(hosts: list[str], sites: dict[str, str]) -> None:
    """Two A-links between each pair of `hosts` (through the metro namespace between sites)."""
    for h in hosts:
        ns = topo.host_ns(h)
        # A route over a link whose far end is down must not be used: the other A-link takes over.
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.ignore_routes_with_linkdown=1")
        # A replication connection to a dead partner must fail in seconds, not minutes.
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_retries2=5")
    for link in topo.a_links(hosts):
        if sites and sites[link.a] != sites[link.b]:
            for side in (link.a, link.b):
                _veth(topo.host_ns(side), link.ifname(side), topo.METRO_NS, link.metro_ifname(side))
                ns_ip(topo.METRO_NS, "link", "set", link.metro_ifname(side), "mtu", "9000", "up")
        else:
            _veth(topo.host_ns(link.a), link.ifname(link.a), topo.host_ns(link.b), link.ifname(link.b))
        for side in (link.a, link.b):
            ns_ip(topo.host_ns(side), "addr", "add", link.addr(side), "dev", link.ifname(side))
            # jumbo frames, as dedicated replication links usually have
            ns_ip(topo.host_ns(side), "link", "set", link.ifname(side), "mtu", "9000", "up")
        _route_replication(link)


LINKDELAY_SRC = Path(__file__).parent / "linkdelay.c"


def _attach_host(h: str, lan_ns: str, quorum_ns: str) -> None:
    """A host's bridge for its VMs on its site's LAN, its own link to its quorum service, and
    its replication address on its loopback."""
    ns = topo.host_ns(h)
    _bridge(ns, "br0", topo.host_lan_addr(h))
    _veth(ns, "lan0", lan_ns, h)
    ns_ip(ns, "link", "set", "lan0", "master", "br0", "up")
    ns_ip(lan_ns, "link", "set", h, "master", "lan", "up")
    _veth(ns, "q0", quorum_ns, h)
    ns_ip(ns, "addr", "add", topo.host_quorum_addr(h), "dev", "q0")
    ns_ip(ns, "link", "set", "q0", "up")
    ns_ip(quorum_ns, "link", "set", h, "master", "qbr", "up")
    ns_ip(ns, "addr", "add", topo.replication_addr(h) + "/32", "dev", "lo")


def _build_dr_site(state: LabState) -> None:
    """The DR site: its LAN (joined to the main one through the WAN forwarder), its quorum
    service's network and management link, and its hosts."""
    for ns in (topo.WAN_NS, topo.DR_LAN_NS, topo.DR_QUORUM_NS, *map(topo.host_ns, state.dr_hosts)):
        _new_ns(ns)
    _bridge(topo.DR_LAN_NS, "lan")
    _bridge(topo.DR_QUORUM_NS, "qbr", f"{topo.DR_ETCD_ADDR}/24")
    _veth(topo.DR_QUORUM_NS, "mgmt", None, topo.DR_MGMT_IF)
    ns_ip(topo.DR_QUORUM_NS, "link", "set", "mgmt", "master", "qbr", "up")
    sh("ip", "addr", "add", topo.DR_MGMT_ADDR, "dev", topo.DR_MGMT_IF)
    sh("ip", "link", "set", topo.DR_MGMT_IF, "up")
    for lan_ns, end in ((topo.LAN_NS, "w-main"), (topo.DR_LAN_NS, "w-dr")):
        _veth(lan_ns, "wan", topo.WAN_NS, end)
        ns_ip(lan_ns, "link", "set", "wan", "master", "lan", "up")
        ns_ip(topo.WAN_NS, "link", "set", end, "up")
    for h in state.dr_hosts:
        _attach_host(h, topo.DR_LAN_NS, topo.DR_QUORUM_NS)
    _a_links(state.dr_hosts, {})  # (levels 2-3 at the DR site: a failover there at its level)
    binary = _linkdelay(state)
    _write_link_params(state, "wan", state.wan)
    state.pids["wan"] = _spawn(topo.WAN_NS, [str(binary), "w-main", "w-dr", str(Path(state.dir) / "wan.params")],
                               Path(state.dir) / "wan.log")


def set_wan(state: LabState, rtt_ms: float, rate_mbit: float) -> None:
    """The WAN link to the DR site: round-trip time (each way half) and rate (0: unlimited)."""
    if not state.dr_hosts:
        raise LabError("this lab has no DR site (`lab up --dr`)")
    _check_link(rtt_ms, rate_mbit)
    state.wan = [rtt_ms, rate_mbit]
    _write_link_params(state, "wan", state.wan)
    os.kill(state.pids["wan"], signal.SIGHUP)
    state.save()


def _check_link(rtt_ms: float, rate_mbit: float) -> None:
    if not 0 <= rtt_ms <= 2000 or not 0 <= rate_mbit <= 100_000:
        raise LabError(f"RTT {rtt_ms:g} ms or rate {rate_mbit:g} Mbit/s out of range (0-2000 ms, 0-100000 Mbit/s)")


def _linkdelay(state: LabState) -> Path:
    """lab/linkdelay.c, built once per lab (the lab's kernel has no netem)."""
    binary = Path(state.dir) / "linkdelay"
    if binary.exists():
        return binary
    proc = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(LINKDELAY_SRC)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise LabError(f"building the link forwarder failed: {proc.stderr.strip()[-500:]}")
    return binary


def _write_link_params(state: LabState, name: str, link: list[float]) -> None:
    rtt_ms, rate_mbit = link
    tmp = Path(state.dir) / f"{name}.params.tmp"
    tmp.write_text(f"{int(rtt_ms * 1000 / 2)} {int(rate_mbit * 1_000_000)}\n")
    tmp.rename(Path(state.dir) / f"{name}.params")


def _metro_links(state: LabState) -> list[topo.ALink]:
    return [x for x in topo.a_links(state.hosts) if state.sites and state.sites[x.a] != state.sites[x.b]]


def _start_metro(state: LabState) -> None:
    """One forwarder per link between the sites (lab/linkdelay.c, built here: the lab's kernel
    has no netem), at no delay and no rate limit until `set_metro`."""
    binary = _linkdelay(state)
    _write_link_params(state, "metro", state.metro)
    for link in _metro_links(state):
        name = f"metro-{link.subnet}"
        state.pids[name] = _spawn(topo.METRO_NS, [str(binary), link.metro_ifname(link.a), link.metro_ifname(link.b),
                                                  str(Path(state.dir) / "metro.params")],
                                  Path(state.dir) / f"{name}.log")


def set_metro(state: LabState, rtt_ms: float, rate_mbit: float) -> None:
    """The links between the sites: round-trip time (each way half) and rate (0: unlimited),
    applied at once by every forwarder (SIGHUP)."""
    if not state.sites:
        raise LabError("this lab has no sites (`lab up --sites 2`)")
    _check_link(rtt_ms, rate_mbit)
    state.metro = [rtt_ms, rate_mbit]
    _write_link_params(state, "metro", state.metro)
    for name, pid in state.pids.items():
        if name.startswith("metro-"):
            os.kill(pid, signal.SIGHUP)
    state.save()


def _route_replication(link: topo.ALink) -> None:
    """Each end reaches the other's replication address over this link (routes die with the
    link). A link still cut at either end gets its routes when it comes back up."""
    for side in (link.a, link.b):
        other = link.b if side == link.a else link.a
        try:
            ns_ip(topo.host_ns(side), "route", "replace", topo.replication_addr(other) + "/32",
                  "via", link.peer_ip(side), "dev", link.ifname(side), "metric", str(link.metric),
                  "src", topo.replication_addr(side))
        except LabError:
            pass  # that end is down


def _traversable(d: Path) -> None:
    """The lab's hosts keep their VMs' files under `d`, and their QEMUs run as an
    unprivileged user that must reach them: every directory above `d` gets search
    permission for others (not read: nothing can be listed). pytest's own temporary
    directory is private otherwise."""
    for p in [d.resolve(), *d.resolve().parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            os.chmod(p, (mode & 0o7777) | 0o001)


def _spawn(ns: str, cmd: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        # The control plane (etcd, agents) runs ahead of the guests, as a host's agent must
        # (etc/ftvm-agent.service: Nice=-10; QEMU drops back to 0, qemu/process.py).
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "nice", "-n", "-10", *cmd], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    return proc.pid  # `ip netns exec` execs the command: this is its PID


def _start_etcd(state: LabState, dr: bool = False) -> None:
    """The main pool's quorum service (`state.etcd_members` members), or (`dr`) the DR pool's."""
    # On tmpfs: the lab's quorum service stands for a dedicated one, and on one shared
    # machine its fsyncs would queue behind the guests' disk writes (a slow keepalive is a
    # self-fence). The lab's RAM directory is removed by `down`.
    topo.LAB_RAM_DIR.mkdir(exist_ok=True)  # (etcd would make it 0700: the hosts' QEMUs keep RAM under it)
    os.chmod(topo.LAB_RAM_DIR, 0o755)
    for member in range(1, (1 if dr else state.etcd_members) + 1):
        start_etcd_member(state, member, dr)
    url, pki = (state.dr_etcd_endpoint, state.dr_pki_dir) if dr else (state.etcd_endpoint, state.pki_dir)
    tls = TlsFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
    if not wait_etcd_healthy(url, 20, tls.client_context()):
        raise LabError(f"etcd did not become healthy; see {state.dir}/{'etcd-dr' if dr else 'etcd'}.log")


def etcd_member_key(member: int, dr: bool = False) -> str:
    """The member's name in `state.pids` (and its data directory's and log's)."""
    return "etcd-dr" if dr else ("etcd" if member == 1 else f"etcd-m{member}")


def start_etcd_member(state: LabState, member: int, dr: bool = False) -> None:
    """Start (or start again, on its data) member `member` (1..etcd_members) of the main
    pool's etcd, or the DR pool's one member."""
    key = etcd_member_key(member, dr)
    data = topo.LAB_RAM_DIR / key
    if dr:
        url, pki, peer, cluster = state.dr_etcd_endpoint, state.dr_pki_dir, "http://127.0.0.1:2380", ""
    else:
        addr = topo.ETCD_MEMBER_ADDRS[member - 1]
        url, pki = f"https://{addr}:{topo.ETCD_PORT}", state.pki_dir
        peer = f"https://{addr}:2380" if state.etcd_members > 1 else "http://127.0.0.1:2380"
    if state.etcd_members > 1 and not dr:
        cluster = ",".join(f"m{i + 1}=https://{a}:2380"
                           for i, a in enumerate(topo.ETCD_MEMBER_ADDRS[:state.etcd_members]))
        peer_tls = ["--peer-cert-file", str(pki / "etcd.crt"), "--peer-key-file", str(pki / "etcd.key"),
                    "--peer-client-cert-auth", "--peer-trusted-ca-file", str(pki / "ca.crt")]
        name = f"m{member}"
    else:
        cluster, peer_tls, name = f"quorum={peer}", [], "quorum"
    state.pids[key] = _spawn(topo.DR_QUORUM_NS if dr else topo.QUORUM_NS, [
        "etcd", "--name", name, "--data-dir", str(data),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        # clients must present a certificate of the pool CA; so must the members to each other
        # (a single member's peer URL is its own loopback)
        "--cert-file", str(pki / "etcd.crt"), "--key-file", str(pki / "etcd.key"),
        "--client-cert-auth", "--trusted-ca-file", str(pki / "ca.crt"), *peer_tls,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", cluster, "--initial-cluster-state", "new",
        "--heartbeat-interval", "100", "--election-timeout", "1000"],
        Path(state.dir) / f"{key}.log")


def wait_etcd_healthy(url: str, timeout: float, tls: ssl.SSLContext | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1, context=tls) as r:
                if b'"true"' in r.read():
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _write_host_config(state: LabState, host: str, probe_kernel: str | None, compare: bool = False,
                       cold: bool = False) -> None:
    d = state.host_dir(host)
    d.mkdir(parents=True, exist_ok=True)
    (d / "local").mkdir(exist_ok=True)
    dr_site = host in state.dr_hosts
    pki = state.pki_of(host)
    lines = [
        f'name = "{host}"', f'pool = "{state.pool_of(host)}"',
        "etcd = [" + ", ".join(f'"{e}"' for e in ([state.dr_etcd_endpoint] if dr_site else state.etcd_endpoints))
        + "]",
        f'state_dir = "{d / "state"}"', 'bridge = "br0"',
        f"memory_mib = {state.host_memory_mib}", f"vcpus = {state.host_vcpus}",
        f'shared_storage = ["{state.shared_dir / "dr" if dr_site else state.shared_dir}"]', 'accel = "auto"',
        # level 0 disks and boot files: the demo guest's cache and the lab's own directory
        f'image_roots = ["{default_cache_dir().parent}", "{state.dir}"]',
        f'local_storage = "{d / "local"}"',
        # the hosts' storage differs on purpose: level 2 copies are raw on odd hosts, qcow2 on even
        f'local_format = "{"raw" if topo.host_index(host) % 2 else "qcow2"}"',
        f'replication_addr = "{topo.replication_addr(host)}"', "debug_qmp = true",
        "stop_grace = 20",  # the demo guest powers off within a second of the ACPI button
        f'ram_dir = "{topo.LAB_RAM_DIR / host}"',
        f'api_listen = "{topo.host_quorum_addr(host).split("/")[0]}:{topo.API_PORT}"',
        f'api_token_file = "{pki / "api-token"}"',
        f'api_read_token_file = "{pki / "api-read-token"}"',
        f'etcd_ca = "{pki / "ca.crt"}"',
        f'etcd_cert = "{pki / "hosts" / (host + ".crt")}"',
        f'etcd_key = "{pki / "hosts" / (host + ".key")}"',
        f'pool_secret_file = "{pki / "pool.secret"}"',
        f'dr_secret_file = "{state.dr_secret_file}"', f'dr_listen = "{topo.dr_receiver(host)}"',
    ] + ([f'site = "{state.sites[host]}"'] if host in state.sites else [])
    peers: dict[str, list[str]] = {}
    for link in topo.a_links(state.dr_hosts if dr_site else state.hosts):
        if host in (link.a, link.b):
            peers.setdefault(link.b if host == link.a else link.a, []).append(link.ifname(host))
    lines.append("a_links = { " + ", ".join(f'{p} = {ifs!r}'.replace("'", '"') for p, ifs in peers.items()) + " }")
    if probe_kernel:
        lines.append(f'probe_kernel = "{probe_kernel}"')
    if compare:
        lines.append('l3_tracking = "compare"')
    if cold:
        lines.append("l3_warm_standby = false")
    lines.append("[timing]")
    lines += [f"{k} = {v}" for k, v in state.timing.items()]
    (d / "host.toml").write_text("\n".join(lines) + "\n")


def start_agent(state: LabState, host: str) -> None:
    d = state.host_dir(host)
    state.pids[f"agent-{host}"] = _spawn(
        topo.host_ns(host), [sys.executable, "-m", "ftvm", "agent", "--config", str(d / "host.toml")],
        d / "agent.log")


def wait_for_hosts(state: LabState, hosts: list[str], timeout: float) -> None:
    """Wait until each host's agent has registered in etcd and serves its API."""
    import asyncio

    from ..store.pool import PoolStore

    dr = bool(hosts) and all(h in state.dr_hosts for h in hosts)

    async def registered() -> set[str]:
        async with state.etcd_client(dr=dr) as c:
            return set((await PoolStore(c, DR_POOL if dr else POOL).snapshot()).hosts)

    https = state.https(dr=dr)

    def api_answers(host: str) -> bool:  # any HTTP answer (401 without a token) will do
        try:
            urllib.request.urlopen(state.api_url(host) + "/api/v1/status", timeout=1, context=https)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if set(hosts) <= asyncio.run(registered()) and all(api_answers(h) for h in hosts):
                return
        except (EtcdError, OSError):
            pass  # etcd or an agent not up yet
        time.sleep(0.2)
    raise LabError(f"agents did not register (and serve their API) within {timeout:g}s: "
                   f"see {state.dir}/hN/agent.log")


# --- failures ----------------------------------------------------------------------

def _host_links(state: LabState, host: str) -> list[tuple[str, str]]:
    """(namespace, interface) of every far end of a host's links."""
    if host in state.dr_hosts:
        return [(topo.DR_LAN_NS, host), (topo.DR_QUORUM_NS, host)]
    ends = [(topo.LAN_NS, host), (topo.QUORUM_NS, host)]
    for link in topo.a_links(state.hosts):
        if host in (link.a, link.b):
            other = link.b if host == link.a else link.a
            ends.append((topo.host_ns(other), link.ifname(other)))
    return ends


def fail_host(state: LabState, host: str) -> float:
    """Power loss: every process of the host SIGKILLed, its links down. Returns the time."""
    _check_host(state, host)
    if host in state.failed:
        raise LabError(f"{host} has already failed")
    for ns, ifname in _host_links(state, host):
        ns_ip(ns, "link", "set", ifname, "down")
    at = time.time()
    kill_namespace_processes(topo.host_ns(host))
    state.failed.append(host)
    state.pids.pop(f"agent-{host}", None)
    state.save()
    return at


def restore_host(state: LabState, host: str) -> None:
    """Power back: links up, the agent starts again (as systemd would)."""
    _check_host(state, host)
    if host not in state.failed:
        raise LabError(f"{host} has not failed")
    for ns, ifname in _host_links(state, host):
        ns_ip(ns, "link", "set", ifname, "up")
    for link in topo.a_links(state.hosts):
        if host in (link.a, link.b):
            if state.sites_cut and state.sites[link.a] != state.sites[link.b]:
                set_a_link(state, link.a, link.b, link.k, up=False)  # the sites stay cut apart
            else:
                _route_replication(link)
    state.failed.remove(host)
    start_agent(state, host)
    state.save()


def restart_agent(state: LabState, host: str, timeout: float = 30, how: str = "stop") -> None:
    """Restart a host's agent and wait until it serves again. `how`: "stop", an orderly
    stop (SIGTERM: the agent stops the VMs it runs on the way out, so empty the host
    first); "detach", the upgrade path (SIGUSR2: it leaves them running for the next
    agent, agent/adoption.py); "kill", a crash (SIGKILL), the next agent started at once."""
    _check_host(state, host)
    sig = {"stop": signal.SIGTERM, "detach": signal.SIGUSR2, "kill": signal.SIGKILL}[how]
    pid = state.pids.get(f"agent-{host}")
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while running(pid):
            if time.monotonic() > deadline:  # (a second agent would be refused its state directory)
                raise LabError(f"{host}'s agent (pid {pid}) did not end within {timeout:g} s of {sig.name}")
            time.sleep(0.02)
    start_agent(state, host)
    state.save()
    wait_for_hosts(state, [host], timeout)


def running(pid: int) -> bool:
    """Not ended, and not a zombie either (its parent may be slow to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def set_a_link(state: LabState, a: str, b: str, k: int, up: bool) -> None:
    """Take one A-link between two hosts down (both ends, as a cut cable) or up again."""
    _check_host(state, a)
    _check_host(state, b)
    links = [x for x in topo.a_links(state.hosts) if {x.a, x.b} == {a, b} and x.k == k]
    if not links:
        raise LabError(f"no A-link {k} between {a} and {b} (links are numbered 1..{topo.A_LINKS_PER_PAIR})")
    link = links[0]
    for side in (link.a, link.b):
        ns_ip(topo.host_ns(side), "link", "set", link.ifname(side), "up" if up else "down")
    if up:  # routes over a link are removed with it: put them back
        _route_replication(link)


def site_hosts(state: LabState, site: str) -> list[str]:
    hosts = [h for h in state.hosts if state.sites.get(h) == site]
    if not hosts:
        known = sorted(set(state.sites.values()))
        raise LabError(f"no site {site!r} in this lab" + (f" (its sites: {', '.join(known)})" if known
                                                          else " (it has none: `lab up --sites 2`)"))
    return hosts


def fail_site(state: LabState, site: str) -> float:
    """A site loses power: each of its hosts fails (as fail_host), one right after the other."""
    hosts = [h for h in site_hosts(state, site) if h not in state.failed]
    if not hosts:
        raise LabError(f"every host at site {site} has failed already")
    at = time.time()
    for h in hosts:
        fail_host(state, h)
    return at


def restore_site(state: LabState, site: str) -> None:
    for h in site_hosts(state, site):
        if h in state.failed:
            restore_host(state, h)


def cut_sites(state: LabState, cut: bool) -> None:
    """Every A-link between the two sites down (or up again); each site keeps its own links
    and its path to the quorum service (the witness)."""
    if len(set(state.sites.values())) < 2:
        raise LabError("this lab has no sites (`lab up --sites 2`)")
    for link in topo.a_links(state.hosts):
        if state.sites[link.a] != state.sites[link.b]:
            set_a_link(state, link.a, link.b, link.k, up=not cut)
    state.sites_cut = cut
    state.save()


def _path_end(state: LabState, host: str, target: str) -> tuple[str, str]:
    if target == "quorum":
        return topo.QUORUM_NS, host
    if target == "lan":
        return topo.LAN_NS, host
    raise LabError(f"unknown path {target!r}: use quorum or lan")


def partition(state: LabState, host: str, target: str) -> None:
    """Cut one path of a host (its link to the quorum site or to the LAN)."""
    _check_host(state, host)
    ns, ifname = _path_end(state, host, target)
    ns_ip(ns, "link", "set", ifname, "down")
    if [host, target] not in state.partitions:
        state.partitions.append([host, target])
    state.save()


def heal(state: LabState, host: str, target: str) -> None:
    _check_host(state, host)
    ns, ifname = _path_end(state, host, target)
    ns_ip(ns, "link", "set", ifname, "up")
    if [host, target] in state.partitions:
        state.partitions.remove([host, target])
    state.save()


def _check_host(state: LabState, host: str) -> None:
    if host not in state.all_hosts:
        raise LabError(f"unknown host {host!r}: the lab has {', '.join(state.all_hosts)}")


# --- teardown ----------------------------------------------------------------------

def down(lab_dir: Path = DEFAULT_DIR) -> list[str]:
    """Remove everything a lab made, with or without its state file. Returns what was removed."""
    removed = []
    for ns in existing_namespaces():
        kill_namespace_processes(ns)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    for mgmt in (topo.MGMT_IF, topo.DR_MGMT_IF):
        if Path(f"/sys/class/net/{mgmt}").exists():
            sh("ip", "link", "del", mgmt, check=False)
            removed.append(mgmt)
    if lab_dir.exists():
        shutil.rmtree(lab_dir)
        removed.append(str(lab_dir))
    if topo.LAB_RAM_DIR.exists():  # level 3 guest RAM files (tmpfs: real memory)
        shutil.rmtree(topo.LAB_RAM_DIR)
        removed.append(str(topo.LAB_RAM_DIR))
    return removed
