"""Health probes of a guest's service, and when a failing one is a guest failure (pure).

A probe is set per VM (`vm add/set --health tcp:PORT | http:PORT/PATH`) and run by the
agent that owns the VM, from its host, against the VM's first address:

    tcp:PORT        healthy when a TCP connection opens within the timeout (catches a dead
                    guest or network; not a service that hangs with its socket still open:
                    the kernel keeps accepting into its backlog)
    http:PORT/PATH  healthy on an HTTP status 200-399 within the timeout (catches a service
                    that hangs)

`failures` probes in a row that fail are a guest failure (core/guest_failures.py): the
guest is restarted where it runs, within the restart limit. Probes are off during a grace
period after the guest (re)boots, and paused while the VM moves (live migration, level
change) or is not running: a probe then counts nothing.

    off --(guest runs, grace over, not moving)--> probing --(N failures)--> failed (one verdict)
     ^                                                |                          |
     +---- paused (moving, not running) <-------------+   guest restarted: grace again
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROBE_RE = re.compile(r"(tcp):([0-9]{1,5})|(http):([0-9]{1,5})(/[\x21-\x7e]{0,200})?")
MAX_REPLY_LINE = 1024  # bytes of an HTTP status line read (a guest's answer is bounded)


@dataclass(frozen=True)
class HealthProbe:
    kind: str      # "tcp" | "http"
    port: int
    path: str = "/"

    @staticmethod
    def parse(text: str) -> HealthProbe:
        """ValueError (a sentence for the operator) when `text` is not a probe."""
        m = PROBE_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"health probe {text!r}: use tcp:PORT or http:PORT/PATH (e.g. http:8080/health)")
        kind, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"health probe {text!r}: port {port} out of range")
        path = (m.group(5) or "/") if kind == "http" else "/"
        return HealthProbe(kind, int(port), path)

    def __str__(self) -> str:
        return f"tcp:{self.port}" if self.kind == "tcp" else f"http:{self.port}{self.path}"


@dataclass(frozen=True)
class HealthSettings:
    """A VM's probe settings (from its spec)."""

    probe: HealthProbe
    interval_s: float
    timeout_s: float
    failures: int
    grace_s: float


def settings_problem(text: str, interval_s: float, timeout_s: float, failures: int, grace_s: float) -> str | None:
    """What makes a VM's probe settings unusable (None: fine; `text` "" is no probe)."""
    if text:
        try:
            HealthProbe.parse(text)
        except ValueError as e:
            return str(e)
    if not 1 <= interval_s <= 3600:
        return f"health interval {interval_s:g} s out of range (1 s to 1 h)"
    if not 0.1 <= timeout_s <= interval_s:
        return f"health timeout {timeout_s:g} s out of range (0.1 s up to the interval, {interval_s:g} s)"
    if not 1 <= failures <= 100:
        return f"health failures {failures} out of range (1-100 in a row)"
    if not 0 <= grace_s <= 86400:
        return f"health grace {grace_s:g} s out of range (0 s to 1 day)"
    return None


def paused_because(running: bool, moving: bool, since_boot_s: float, grace_s: float) -> str | None:
    """Why no probe counts now (None: probe). `since_boot_s`: since the guest last booted or
    was reset here, or since this host took it over."""
    if not running:
        return "not running"
    if moving:
        return "moving (live migration or level change)"
    if since_boot_s < grace_s:
        return f"grace period after boot ({grace_s - since_boot_s:.0f} s left)"
    return None


@dataclass
class HealthTracker:
    """Failures in a row of one VM's probe, and the verdict they lead to."""

    failures_needed: int
    in_a_row: int = 0
    last_error: str = ""

    def pause(self) -> None:
        """Nothing measured while paused counts, before or after."""
        self.in_a_row, self.last_error = 0, ""

    def record(self, error: str | None) -> str | None:
        """One probe's outcome (None: healthy); the failure cause once `failures_needed` in a
        row failed (then counting starts again)."""
        if error is None:
            self.in_a_row, self.last_error = 0, ""
            return None
        self.in_a_row += 1
        self.last_error = error
        if self.in_a_row < self.failures_needed:
            return None
        n, self.in_a_row = self.in_a_row, 0
        return f"{n} probes in a row failed (last: {error})"
