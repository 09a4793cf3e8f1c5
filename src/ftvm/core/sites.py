"""Sites (SplitSite): hosts in two buildings, the quorum service at a third (pure).

A host says where it stands (host.toml `site = "a"`, published in its HostInfo). With
hosts at two or more sites, a level 2 or 3 VM's partner goes to another site than its
primary whenever one has room (core/placement.py), and a level 1 VM should have a host at
another site that can restart it. When that does not hold, the VM is still protected
against the loss of one host, but not of its site: status says so, and why.

A host's site is known only while its lease lives (its HostInfo record): a VM whose
partner is down is not protected at all, which status already says.

When the sites lose each other (every link between them down) while both still reach the
witness, exactly one side keeps each VM. A VM may name its preferred site (`vm add
--site a`): it runs there when it can, and in such a cut that site keeps it, as vSAN's
preferred site does. Without one, the side running the VM keeps it.

    primary at the preferred site, or no preferred site:
        the partner's copy is recorded outdated and the VM carries on (as for any lost link)
    primary at the other site, its partner at the preferred site and up:
        level 2: the guest stays stopped (nothing it wrote since is acknowledged) while the
                 primary checks that the partner still renews its lease (it reaches the
                 witness: a cut, not a lost site); then QEMU stops, ownership is released,
                 and the partner, whose copy is current, restarts the VM (`yields_in_cut`,
                 `renewed_since`). A partner that stopped renewing is lost with its site:
                 its copy is recorded outdated and the VM carries on here.
        level 3: the primary does not record the partner's copy outdated; the guest stays
                 stopped, output held, while the partner takes the VM over from the last
                 checkpoint with its connections open. If no takeover comes within a few
                 keepalives, the partner's copy is recorded outdated and the VM carries on.
    level 3 partner at the other site, its primary at the preferred site: it waits twice as
        long before taking over (`takeover_delay`), so the primary's record comes first.

A site cut from the witness as well (an asymmetric cut) loses its lease: its hosts stop
their VMs before the lease ends, and the site that reaches the witness takes them over,
whatever the VM prefers: quorum decides first, the preferred site only between equals.
"""

from __future__ import annotations

from .model import Level, PoolSnapshot, VmSpec, VmView
from .replication import CopyState


def site_of(snapshot: PoolSnapshot, host: str) -> str:
    info = snapshot.hosts.get(host)
    return info.site if info is not None else ""


def sites(snapshot: PoolSnapshot) -> set[str]:
    """The sites of the live hosts that name one."""
    return {h.site for h in snapshot.hosts.values() if h.site}


def site_caveat(snapshot: PoolSnapshot, view: VmView, restart_hosts: list[str]) -> str:
    """Why a protected VM would not survive the loss of its site ("" when it would, or when
    the pool has fewer than two sites). `restart_hosts`: level 1, the hosts that could
    restart it."""
    if view.owner is None or len(sites(snapshot)) < 2:
        return ""
    here = view.owner.host
    site = site_of(snapshot, here)
    if not site:
        return f"{here} names no site (host.toml `site`)"
    if view.spec.level is Level.RESTART:
        if any(site_of(snapshot, h) not in ("", site) for h in restart_hosts):
            return ""
        return (f"does not survive the loss of site {site}: no host at another site can restart it "
                "(room, and its shared storage)")
    if not view.spec.level.has_copies or view.copies is None:
        return ""
    partner = view.copies.partner_of(here)
    if partner is None or site_of(snapshot, partner) != site:
        return ""
    others = sorted(h for h, info in snapshot.hosts.items() if info.site and info.site != site)
    why = (f"no host at another site ({', '.join(others)}) had room when the partner was chosen" if others
           else "no host at another site is up")
    return f"does not survive the loss of site {site}: its partner {partner} is there too ({why})"


def across_sites(snapshot: PoolSnapshot, a: str, b: str) -> bool:
    """Whether hosts `a` and `b` stand at two different sites: the link between them is the
    metro link, slow next to a LAN, so level 3 compresses its checkpoints on it."""
    site_a, site_b = site_of(snapshot, a), site_of(snapshot, b)
    return bool(site_a and site_b and site_a != site_b)


COMPRESS_WHEN = ("between-sites", "always", "never")  # host.toml `l3_compress`


def compresses(when: str, across: bool) -> bool:
    """Whether a level 3 session asks for compressed checkpoints: by default only to a partner
    at another site (a metro link; on a LAN it costs more time than it saves)."""
    return when == "always" or (when == "between-sites" and across)


def at_preferred_site(snapshot: PoolSnapshot, spec: VmSpec, hosts: list[str]) -> list[str]:
    """Of `hosts` (best first), those at the VM's preferred site if any is; else all of them."""
    if not spec.site:
        return hosts
    there = [h for h in hosts if site_of(snapshot, h) == spec.site]
    return there or hosts


def yields_in_cut(snapshot: PoolSnapshot, view: VmView, me: str) -> str | None:
    """The owner `me` lost its partner: why it should leave the VM to the partner rather
    than carry on without it (None: carry on). Only at another site than the VM's preferred
    one, with the partner there, up (its lease alive) and its copy current."""
    spec, copies = view.spec, view.copies
    if not spec.site or copies is None or not spec.level.has_copies:
        return None
    partner = copies.partner_of(me)
    if partner is None or partner not in snapshot.hosts or view.copy_state(partner) is not CopyState.CURRENT:
        return None
    if site_of(snapshot, me) == spec.site or site_of(snapshot, partner) != spec.site:
        return None
    if spec.level is Level.COMPONENT and not any(e.host == partner for e in view.exports):
        return None  # it withdrew its copy itself (its daemon failed, or it stops): not a cut
    return (f"the link to {partner} is lost while {partner} is up: site {spec.site}, the VM's preferred "
            f"site, keeps it")


def cut_check_s(keepalive_interval: float) -> float:
    """How long a primary away from the preferred site keeps its guest stopped before it
    decides (level 2: asks whether the partner renewed its lease meanwhile; level 3: gives
    up waiting for the partner's takeover): three keepalives and a second, so that a partner
    that reaches the witness has renewed at least once (see `renewed_since`)."""
    return 3 * keepalive_interval + 1.0


def renewed_since(left_s: float, granted_s: float, elapsed_s: float) -> bool:
    """Whether a lease with `left_s` of its `granted_s` left was renewed within the last
    `elapsed_s` (etcd reports whole seconds, rounded down: `elapsed_s` should be at least
    two keepalive intervals more than one second)."""
    return left_s > 0 and left_s > granted_s - elapsed_s


def takeover_delay(snapshot: PoolSnapshot, view: VmView, me: str, takeover_after: float) -> float:
    """How long a level 3 partner `me` waits on a silent primary before taking over: twice
    as long when the primary stands at the VM's preferred site, its host up, and `me` does
    not (in a cut between the sites, the primary records this copy outdated first)."""
    owner, site = view.owner, view.spec.site
    if (owner is None or not site or owner.host not in snapshot.hosts
            or site_of(snapshot, owner.host) != site or site_of(snapshot, me) == site):
        return takeover_after
    return 2 * takeover_after
