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


def test_the_level3_tables_show_both_engines_by_size_and_failovers_per_size() -> None:
    from ftvm.showcase.bench_l3 import check_failed, print_level3
    engine = {"per_s": 50.0, "pause_p50_ms": 7.6, "pause_p99_ms": 12.9, "stop_p50_ms": 0.6, "ram_diff_p50_ms": 0.5,
              "disk_diff_p50_ms": 3.1, "device_state_p50_ms": 2.4, "cont_p50_ms": 0.5, "ack_p50_ms": 2.2,
              "dirty_pages_p50": 126.0, "running_fraction": 0.59, "partner_silence_max_ms": 61.0}

    def row(config: str, rps: float, e: dict | None) -> dict:
        return {"config": config, "latency_p50_ms": 14.1, "latency_p99_ms": 46.0, "latency_p50_ratio": 15.2,
                "closed_loop": [{"requests_per_s": rps}] * 3, "throughput_ratios": [0.07, 0.3, 0.39],
                **({"engine": e} if e else {})}
    failover = {"memory_mib": 2048, "disk_gib": 20, "runs": [{}, {}, {}],
                "warm": {"runs": 2, "reply_after_loss_median_s": 0.47, "reply_after_loss_max_s": 0.52,
                         "takeover_median_s": 0.31},
                "cold": {"runs": 1, "reply_after_loss_median_s": 0.93, "reply_after_loss_max_s": 1.1,
                         "takeover_median_s": 0.3},
                "pause_median_s": 0.9, "connections_kept": 3, "lost_total": 0, "seq_breaks_total": 0, "max_copies": 1}
    out = {"configs": [row("L0", 1000, None), row("L3 tracking", 70, engine)],
           "two_vcpus": [row("L3 tracking, 2 vCPUs", 60, engine)],
           "pause_by_size": [{"engine": "tracking", "memory_mib": 2048, "disk_gib": 20, **engine},
                             {"engine": "compare", "memory_mib": 2048, "disk_gib": 20, "error": "not protected"}],
           "failover": [failover]}
    width = console.width
    console.width = 220  # (a narrow terminal wraps the cells; what they hold is the same)
    try:
        with console.capture() as cap:
            print_level3(out)
    finally:
        console.width = width
    text = cap.get()
    assert "2048 MiB, 20 GiB disk, tracking" in text and "not protected" in text
    assert "7.6/12.9" in text and "0.47/0.52 (2)" in text and "0.93/1.10 (1)" in text and "3/3" in text
    assert "61" in text  # the partner's longest silence
    assert not check_failed(out)
    assert check_failed(out | {"failover": [failover | {"lost_total": 1}]})


def test_the_dr_tables_show_lag_model_bytes_latency_and_the_goals() -> None:
    from ftvm.showcase.bench_dr import goals, print_dr
    point = {"rate_mbit": 150.0, "points": 30, "lag": {"p50_s": 1.93, "p99_s": 3.56, "max_s": 3.8},
             "model": {"p50_s": 1.8, "p99_s": 3.3, "max_s": 3.3}, "written_mib": 229.0, "sent_mib": 144.2,
             "sent_per_written": 0.63, "latency_ms": {"shipped": {"p50": 1.03}, "plain": {"p50": 1.03}},
             "latency_ratio_p50": 1.0, "model_error_p99": 0.073}
    slow = point | {"rate_mbit": 20.0, "lag": {"p50_s": 4.3, "p99_s": 6.9, "max_s": 6.9}, "model_error_p99": 0.25}
    out = {"points": [point, slow]}
    out["goals"] = goals(out)
    assert out["goals"]["lag p99 <= 5 s at 150 Mbit/s"]["met"]
    assert not out["goals"]["modeler error on p99 lag <= 20% at 20 Mbit/s"]["met"]
    width, console.width = console.width, 250  # (a row on one line)
    try:
        with console.capture() as cap:
            print_dr(out)
    finally:
        console.width = width
    text = cap.get()
    assert "1.93 / 3.56" in text and "1.8 / 3.3" in text and "144.2 (0.63)" in text and "25%" in text


def test_the_dr_demo_summary_states_the_loss_and_the_fencing() -> None:
    from ftvm.lab.dr_story import DrStory
    from ftvm.showcase.demo import _summary_table
    story = DrStory(wan_rtt_ms=40, wan_rate_mbit=150, rpo_s=6, dr_confirm_s=15, points_before_loss=3, point=4,
                    point_age_at_loss_s=0.33, acknowledged=147, lost=14, lost_before_cut=0, kept_after_cut=0,
                    loss_statement="loses every write after 10:14:36.2, 0.0 s or more", stated_loss_s=0.0,
                    running_at_dr_s=25.0, first_reply_s=28.9, protected_at_dr_s=29.1, old_site_fenced=True,
                    max_copies=1)
    assert story.ok and story.to_json()["ok"]
    width, console.width = console.width, 400
    try:
        with console.capture() as cap:
            console.print(_summary_table(story))
    finally:
        console.width = width
    text = cap.get()
    assert "14 of 147" in text and "every one acknowledged after the cut" in text and "did not start it" in text
