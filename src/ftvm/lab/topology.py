"""The lab's network plan (pure): namespaces, links and addresses.

    ftvm-client --eth0----+                         +-- mgmt (root namespace: CLI)
                          |                         |
    ftvm-lan  [bridge lan]+--- hN/lan0 ---+     ftvm-quorum [bridge qbr] etcd @ 10.77.1.1
                                          |         |
    ftvm-hN  [bridge br0: VMs' taps, 10.77.0.1N] ---+ q0 (10.77.1.1N)
             a1-hM / a2-hM: two A-links to each other host (10.78.x.N)
             lo: replication address 10.79.0.N, routed over a1 (metric 10) then a2 (metric 20)

Every host reaches the quorum site over its own link, so one path can be cut
(`partition H --from quorum`) while the others stay up.

`lab up --dr` adds a DR site: another pool ("dr") with its own quorum service, reached
over a WAN link (lab/linkdelay.c: RTT and rate, set while the lab runs). The WAN carries
the LAN itself, so a VM failed over there keeps its address:

    ftvm-lan [bridge lan] --wan-- ftvm-wan (linkdelay) --wan-- ftvm-drlan [bridge lan] -- h8, h9 /lan0
                                                     ftvm-drquorum [bridge qbr] etcd @ 10.77.2.1 -- h8, h9 /q0
    h8 and h9 have two A-links between them, as the main site's hosts do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PREFIX = "ftvm-"
LAN_NS = PREFIX + "lan"
QUORUM_NS = PREFIX + "quorum"
CLIENT_NS = PREFIX + "client"
MGMT_IF = "ftvm-mgmt"          # root-namespace end of the management link
MGMT_ADDR = "10.77.1.254/24"
ETCD_ADDR = "10.77.1.1"
ETCD_MEMBER_ADDRS = ("10.77.1.1", "10.77.1.2", "10.77.1.3")  # `lab up --etcd-members 3`: one each
ETCD_PORT = 2379
API_PORT = 7400                # each agent's REST API and /metrics, on its quorum-side address
DR_PORT = 7420                 # each agent's DR receiver (dr_listen), on its LAN address
LAB_RAM_DIR = Path("/dev/shm/ftvm-lab")  # level 3 guest RAM files of the lab's hosts
CLIENT_ADDR = "10.77.0.2/24"
VM_SUBNET_FIRST = 100          # demo VMs get 10.77.0.100 and up
A_LINKS_PER_PAIR = 2


WAN_NS = PREFIX + "wan"          # `lab up --dr`: the forwarder between the main LAN and the DR site's
DR_LAN_NS = PREFIX + "drlan"
DR_QUORUM_NS = PREFIX + "drquorum"
DR_ETCD_ADDR = "10.77.2.1"
DR_MGMT_IF = "ftvm-mgmtdr"
DR_MGMT_ADDR = "10.77.2.254/24"
DR_HOSTS = ("h8", "h9")          # the DR pool's hosts (A-links between them, as a site's hosts have)


def host_names(n: int) -> list[str]:
    return [f"h{i}" for i in range(1, n + 1)]


METRO_NS = PREFIX + "metro"  # a site lab's links between the sites pass through here (lab/linkdelay.c)
SITE_NAMES = ("a", "b")  # `lab up --sites 2`: the hosts' sites; the quorum namespace is the witness site


def host_sites(hosts: list[str], n_sites: int) -> dict[str, str]:
    """The site of each host with `n_sites` (0: no sites): the first half at a, the rest at
    b (h1 a, h2 b with 2 hosts; h1 h2 a, h3 b with 3; h1 h2 a, h3 h4 b with 4)."""
    if n_sites == 0:
        return {}
    half = (len(hosts) + 1) // 2
    return {h: SITE_NAMES[0] if i < half else SITE_NAMES[1] for i, h in enumerate(hosts)}


def host_ns(host: str) -> str:
    return PREFIX + host


def host_index(host: str) -> int:
    return int(host[1:])


def host_lan_addr(host: str) -> str:
    return f"10.77.0.{10 + host_index(host)}/24"


def dr_receiver(host: str) -> str:
    """Where a lab host takes DR points (every lab host can receive them)."""
    return f"{host_lan_addr(host).split('/')[0]}:{DR_PORT}"


def host_quorum_addr(host: str) -> str:
    """Where the host reaches its pool's quorum service (and serves its API)."""
    return f"10.77.{2 if host in DR_HOSTS else 1}.{10 + host_index(host)}/24"


def replication_addr(host: str) -> str:
    """The host's replication address: on its loopback, reached over either A-link
    (routes with two metrics), so a replication TCP connection survives one A-link's loss."""
    return f"10.79.0.{host_index(host)}"


def vm_addr(index: int) -> str:
    return f"10.77.0.{VM_SUBNET_FIRST + index}/24"


@dataclass(frozen=True)
class ALink:
    """One availability link between two hosts: veth `a{k}-{b}` in a, `a{k}-{a}` in b."""

    a: str
    b: str
    k: int

    @property
    def subnet(self) -> int:
        i, j = host_index(self.a), host_index(self.b)
        return 10 * i + j + 100 * (self.k - 1)

    def ifname(self, side: str) -> str:
        other = self.b if side == self.a else self.a
        return f"a{self.k}-{other}"

    def metro_ifname(self, side: str) -> str:
        """A link between sites: the metro namespace's end of `side`'s half."""
        return f"m{self.subnet}-{side}"

    def addr(self, side: str) -> str:
        return f"10.78.{self.subnet}.{host_index(side)}/24"

    def peer_ip(self, side: str) -> str:
        """The address of the other end, seen from `side`."""
        other = self.b if side == self.a else self.a
        return self.addr(other).split("/")[0]

    @property
    def metric(self) -> int:
        return 10 * self.k


def a_links(hosts: list[str]) -> list[ALink]:
    return [ALink(a, b, k) for i, a in enumerate(hosts) for b in hosts[i + 1:]
            for k in range(1, A_LINKS_PER_PAIR + 1)]
