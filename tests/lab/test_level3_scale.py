"""Level 3 at production sizes (issue 15): a 2 GiB, 2-vCPU guest with a 20 GiB (sparse)
disk, protected with the exact engine (RAM writes from the kernel, disk writes from QEMU
dirty bitmaps), survives its host's power loss with its connection open and nothing
acknowledged lost, and is protected again from the other side (about 40 s here)."""

from __future__ import annotations

import pytest

from ftvm.core.model import Level
from ftvm.lab import lab as labmod
from ftvm.lab.scenario import LabClient, LabPool, l3_protected, level3_failover

pytestmark = pytest.mark.lab
INDEX = 90


def test_a_2_gib_2_vcpu_guest_with_a_20_gib_disk_fails_over_at_level_3(lab_big: labmod.LabState,
                                                                       guest_image) -> None:
    pool = LabPool(lab_big)
    spec = pool.define_ledger_vm("huge", INDEX, Level.SYSTEM, guest_image, host="h1", memory_mib=2048,
                                 vcpus=2, disk_size=20 << 30)
    ip = spec.nics[0].ip.split("/")[0] if spec.nics[0].ip else ""
    try:
        pool.wait_running("huge", 120)
        pool.wait_answering(ip, 120)
        pool.wait_for("level 3 protection of the 2 GiB guest", l3_protected("huge"), 600)
        client = LabClient(lab_big, ip, "huge-load", 0.02, reply_timeout=60)  # load while measured
        try:
            client.wait_acks(100, 60)
        finally:
            client.stop()
        figures = pool.snapshot().vms["huge"].checkpoints
        assert figures is not None and figures.tracking.startswith("exact"), figures
        assert figures.disk_tracking == "dirty bitmaps" and figures.full_resyncs == 0
        print(f"2 GiB / 20 GiB guest under load: pause p50 {figures.pause_p50_ms} ms, p99 {figures.pause_p99_ms} ms, "
              f"RAM {figures.ram_diff_p50_ms} ms, disk {figures.disk_diff_p50_ms} ms, "
              f"{figures.dirty_pages_p50:.0f} dirty pages, guest running {figures.running_fraction:.0%}")
        r = level3_failover(pool, spec, healthy_s=5)
        assert r.connection_kept and r.lost == 0 and r.seq_gaps == 0 and r.seq_repeats == 0, r
        assert r.max_copies == 1, r
        assert not r.guest_problems, r.guest_problems
        labmod.restore_host(lab_big, r.failed_host)
        pool.wait_for("protected again, from the other side", l3_protected("huge"), 600)
        print(f"failover: next reply {r.reply_after_loss_s} s after the power loss, {r.acknowledged} acknowledged")
    finally:
        pool.stop_and_remove("huge")
