"""The lab itself and the demo command, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo

pytestmark = pytest.mark.lab


def _leftovers() -> dict[str, object]:
    return {"namespaces": labmod.existing_namespaces(),
            "mgmt": Path(f"/sys/class/net/{topo.MGMT_IF}").exists(), "ram": topo.LAB_RAM_DIR.exists()}


def test_down_cleans_up_after_a_crash_without_state(lab_parent: Path, guest_image) -> None:
    if labmod.existing_namespaces():
        pytest.fail("a lab is already up")
    lab_dir = lab_parent / "lab"
    try:
        state = labmod.up(2, lab_dir, probe_kernel=str(guest_image.kernel))
        pids = list(state.pids.values())
        assert all(Path(f"/proc/{p}").exists() for p in pids)
        (lab_dir / "lab.json").unlink()  # as if the command that made it had crashed
    finally:
        removed = labmod.down(lab_dir)
    assert "ftvm-h1" in removed
    assert _leftovers() == {"namespaces": [], "mgmt": False, "ram": False}
    for pid in pids:  # etcd and agents are gone (zombies of ours aside)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            assert stat.rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            pass
    assert not lab_dir.exists()


@pytest.mark.parametrize("level", [1, 2, 3])
def test_demo_prints_summary_as_json(lab_parent: Path, level: int) -> None:
    if labmod.existing_namespaces():
        pytest.fail("a lab is already up")
    try:
        r = subprocess.run([sys.executable, "-m", "ftvm", "demo", "--level", str(level), "-o", "json",
                            "--lab-dir", str(lab_parent / "lab")], capture_output=True, text=True, timeout=300,
                           env=os.environ | {"COLUMNS": "100"})
    finally:  # a failed demo leaves its lab up for inspection: not here, the next test needs the machine
        labmod.down(lab_parent / "lab")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["level"] == level
    assert summary["lost"] == 0
    assert summary["max_copies"] == 1
    assert _leftovers() == {"namespaces": [], "mgmt": False, "ram": False}  # the demo tore its lab down
    if level == 3:  # carried on: one connection, a pause, the Level 1 VM beside it rebooted
        assert summary["connection_kept"] is True and summary["connections"] == 1
        assert summary["acknowledged"] >= 100 and summary["seq_gaps"] == summary["seq_repeats"] == 0
        assert 0 < summary["pause_s"] < summary["level1_outage_s"]
        assert summary["level1_connections"] >= 2 and summary["guest_problems"] == []
        assert summary["reprotect_s"] > 0
        return
    assert summary["acknowledged"] >= 200
    if level == 2:
        # masked: the guest carried on, far sooner than a restart after a host loss would let it
        assert summary["disk_failure_stall_s"] < summary["outage_s"], summary
        assert summary["resync_bytes"] >= 64 << 20  # the returning old primary: full resync
    for key in ("outage_s", "detection_s", "restart_s"):
        assert summary[key] > 0
    assert summary["outage_s"] >= summary["detection_s"]
