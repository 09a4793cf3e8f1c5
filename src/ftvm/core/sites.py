"""Sites (SplitSite): hosts in two buildings, the quorum service at a third (pure).

A host says where it stands (host.toml `site = "a"`, published in its HostInfo). With
hosts at two or more sites, a level 2 or 3 VM's partner goes to another site than its
primary whenever one has room (core/placement.py), and a level 1 VM should have a host at
another site that can restart it. When that does not hold, the VM is still protected
against the loss of one host, but not of its site: status says so, and why.

A host's site is known only while its lease lives (its HostInfo record): a VM whose
partner is down is not protected at all, which status already says.
"""

from __future__ import annotations

from .model import Level, PoolSnapshot, VmView


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
