"""Choose the accelerator: KVM where a probe boot shows it works, TCG otherwise.

/dev/kvm existing is not enough: under nested PVM a normal Linux guest never
boots (-cpu host aborts, other models hang). The probe boots a real kernel
with no root fs under KVM and expects its panic message on the serial port
within a few seconds. The answer is cached until the next host boot.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
CACHE = Path("/run/ftvm/accel-probe.json")


@dataclass(frozen=True)
class Accel:
    accel: str  # "kvm" or "tcg"
    cpu: str    # -cpu model
    reason: str


TCG = Accel("tcg", "qemu64", "")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(kernel: Path, timeout: float = 10.0) -> Accel:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "qemu64", "/dev/kvm not usable")
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "serial.log"
        cmd = [QEMU, "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults", "-display", "none",
               "-no-reboot", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
               "-serial", f"file:{serial}"]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Accel("tcg", "qemu64", f"KVM probe boot hung for {timeout:g}s")
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if "Kernel panic" in text:
            return Accel("kvm", "host", "KVM probe boot reached the kernel")
        return Accel("tcg", "qemu64", "KVM probe boot failed")


def choose_accel(setting: str, probe_kernel: Path | None) -> Accel:
    """`setting` is "auto", "kvm" or "tcg" (from host.toml)."""
    if setting == "tcg":
        return Accel("tcg", "qemu64", "configured")
    if setting == "kvm":
        return Accel("kvm", "host", "configured")
    if probe_kernel is None or not probe_kernel.exists():
        return Accel("tcg", "qemu64", "no kernel to probe KVM with")
    try:
        cached = json.loads(CACHE.read_text())
        if cached.get("boot_id") == _boot_id() and cached.get("kernel") == str(probe_kernel):
            return Accel(cached["accel"], cached["cpu"], cached["reason"] + " (cached)")
    except (OSError, ValueError, KeyError):
        pass
    result = probe_kvm(probe_kernel)
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps({"boot_id": _boot_id(), "kernel": str(probe_kernel),
                                     "accel": result.accel, "cpu": result.cpu, "reason": result.reason}))
    except OSError:
        pass
    return result
