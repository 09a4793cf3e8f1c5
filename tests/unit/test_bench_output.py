"""The Level 2 benchmark's table: every figure with its ratio and the rounds' spread."""

from __future__ import annotations

from ftvm.showcase.bench import print_level2
from ftvm.cli.common import console

FIGURES = ("throughput_mib_s", "throughput_qd4_mib_s", "throughput_64k_mib_s", "throughput_buffered_mib_s",
           "latency_p50_ms", "latency_p99_ms", "device_write_us", "device_write_kib", "device_flush_us")


def test_the_table_shows_ratios_and_the_rounds_spread() -> None:
    level0 = {k: 100.0 for k in FIGURES}
    level2 = {k: 87.0 for k in FIGURES}
    out = {"write_mib": 64, "level0": level0, "level2": level2, "ratios": {k: 0.87 for k in FIGURES},
           "ratio_range": {"throughput_mib_s": [0.81, 0.93]},
           "resync": {"bytes_copied": 16 << 20, "bytes_written_apart": 16 << 20, "efficiency": 1.0},
           "failover": {"runs": [{}] * 3, "outage_median_s": 7.5, "outage_max_s": 8.7, "lost_total": 0}}
    with console.capture() as cap:
        print_level2(out)
    text = cap.get()
    assert "0.81-0.93" in text and text.count("0.87") == len(FIGURES)
    assert "efficiency 1.00" in text and "median 7.50 s, max 8.70 s" in text
