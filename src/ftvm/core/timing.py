"""Agent timings and the invariants that keep them safe.

The host lease is the heart of fencing: etcd forgets a host `lease_ttl` after
the last keepalive it received, and another host may then restart its VMs.
The agent counts from when it *sent* that keepalive (earlier than etcd's
receipt), and kills its VMs `self_fence_margin` before the lease can expire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

CLOCK_SLOP_S = 0.2  # scheduling delays between the guard noticing and the kill


class TimingError(ValueError):
    pass


@dataclass(frozen=True)
class Timing:
    tick: float = 0.5                  # reconcile period (events also wake the loop)
    lease_ttl: float = 5.0             # host lease; detection time is at most this
    keepalive_interval: float = 1.0    # how often the lease is renewed
    etcd_timeout: float = 1.0          # per request to etcd
    self_fence_margin: float = 1.5     # kill VMs this long before the lease can expire
    fence_check: float = 0.05          # how often the fence guard looks at the deadline
    kill_timeout: float = 0.5          # time allowed for a SIGKILLed QEMU to be gone
    # Level 3: the primary gives up on a silent partner after `l3_partner_lost` (and records
    # its replica outdated before releasing output); the partner takes over from a silent
    # primary after `l3_takeover_after`. Either order is safe (one etcd write wins), but a
    # primary that merely lost the A-links should keep its VM: the gap between the two is
    # its time to write to etcd, so it must cover a slow etcd write on a loaded host.
    # Heartbeats go every 25 ms both ways; the longest silence seen on a loaded lab was
    # ~70 ms (`partner_silence_max_ms` in `vm show`). The takeover should come before a
    # client's TCP retransmission at ~0.45 s (a tail-loss probe at ~0.22 s, then the RTO of
    # ~0.22 s, then 0.92 s: measured in the lab client's socket): a guest running again at
    # 0.55 s answered only the one at 0.92 s.
    # The primary heartbeats during a checkpoint too, for at most `l3_checkpoint_stall`:
    # a checkpoint stuck longer (QEMU hung) is a failed primary.
    l3_partner_lost: float = 0.15
    l3_takeover_after: float = 0.3
    l3_checkpoint_stall: float = 2.0
    # Levels 2-3 in pools of 3-4 hosts: a partner down this long is replaced by a new replica
    # on another host (a returning partner resyncs only what changed; a new one copies all).
    partner_replace_after: float = 60.0
    # Asynchronous DR: a VM with a DR target is started (not kept running) only within this
    # long after its DR site last confirmed it has not taken the VM over; a DR failover waits
    # until this pool was silent this long and more (docs/dr.md: why no site ever restarts a
    # VM the DR site runs).
    dr_confirm: float = 60.0

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Timing:
        if not isinstance(d, dict):
            raise TimingError("timing must be a table of settings")
        known = {f.name for f in fields(Timing)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise TimingError(f"unknown timing setting(s): {', '.join(unknown)}")
        bad = sorted(k for k, v in d.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                     or not math.isfinite(v) or abs(v) > 1e6)
        if bad:
            raise TimingError(f"timing settings must be numbers of seconds: {', '.join(bad)}")
        t = Timing(**{k: float(v) for k, v in d.items()})
        t.check()
        return t

    def violations(self) -> list[str]:
        out = [f"{f.name} must be > 0" for f in fields(self) if getattr(self, f.name) <= 0]
        if out:
            return out
        renew_window = self.lease_ttl - self.self_fence_margin
        if 2 * self.keepalive_interval + self.etcd_timeout > renew_window:
            out.append(
                f"2*keepalive_interval + etcd_timeout ({2 * self.keepalive_interval + self.etcd_timeout:g}s) "
                f"must be <= lease_ttl - self_fence_margin ({renew_window:g}s): "
                "one lost keepalive would fence a healthy host")
        need = self.fence_check + self.kill_timeout + CLOCK_SLOP_S
        if self.self_fence_margin < need:
            out.append(
                f"self_fence_margin ({self.self_fence_margin:g}s) must be >= fence_check + kill_timeout "
                f"+ {CLOCK_SLOP_S}s ({need:g}s): VMs might outlive the lease")
        if self.l3_takeover_after < self.l3_partner_lost + 0.1:
            out.append(f"l3_takeover_after ({self.l3_takeover_after:g}s) must be >= l3_partner_lost + 0.1s "
                       f"({self.l3_partner_lost + 0.1:g}s): the primary should get the first word")
        if self.tick > self.lease_ttl / 2:
            out.append(f"tick ({self.tick:g}s) must be <= lease_ttl/2 ({self.lease_ttl / 2:g}s)")
        return out

    def check(self) -> None:
        problems = self.violations()
        if problems:
            raise TimingError("timing invariant broken: " + "; ".join(problems))
