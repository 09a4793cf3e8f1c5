"""The fault campaign's report (lab/campaign.py), from cycles: the table and the JSON a
reader and a replay rely on."""

from __future__ import annotations

from ftvm.lab.campaign import CampaignReport, Cycle, Fault, render


def test_recovery_is_tabled_per_vm_and_fault_and_violations_name_their_cycle() -> None:
    r = CampaignReport(5, acked={"camp2": 700})
    r.cycles = [Cycle(1, [Fault("power", "h1", hold_s=4)], {"camp2": 3.0}),
                Cycle(2, [Fault("power", "h2", hold_s=9), Fault("a-link", "h1", "h3", hold_s=2)], {"camp2": 5.0}),
                Cycle(3, [Fault("qemu-crash", "h2", vm="camp2")], {"camp2": 1.0}, ["camp2: 3 records missing"],
                      {"camp2": 2.5})]
    d = r.to_json()
    assert d["faults"] == {"a-link": 1, "power": 2, "qemu-crash": 1}
    assert d["recovery_s"]["camp2/power"] == {"n": 2, "p50": 5.0, "p99": 5.0, "max": 5.0}
    assert d["unprotected_s"] == {"camp2/qemu-crash": {"n": 1, "p50": 2.5, "p99": 2.5, "max": 2.5}}
    assert d["violations"] == [{"cycle": 3, "what": "camp2: 3 records missing"}]
    assert d["schedule"][1]["faults"][1] == {"kind": "a-link", "host": "h1", "peer": "h3", "vm": "", "hold_s": 2}
    text = render(r)
    assert "camp2/qemu-crash" in text.split("first seen unprotected")[1]
    assert "seed 5: 3 cycles" in text and "invariant violations: 1" in text and "cycle 3: camp2" in text
    assert str(Fault("a-link", "h1", "h3", hold_s=2)) == "a-link h1-h3 for 2s"


def test_a_report_gives_back_its_schedule_for_a_replay(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ftvm.lab.campaign import dump, recorded_schedule
    r = CampaignReport(9)
    r.cycles = [Cycle(1, [Fault("agent-upgrade", "h2")]),
                Cycle(2, [Fault("guest-panic", "h1", vm="camp3"), Fault("a-links", "h2", "h3", hold_s=4.5)])]
    dump(r, tmp_path / "r.json")
    seed, schedule = recorded_schedule(tmp_path / "r.json")
    assert seed == 9 and schedule == [c.faults for c in r.cycles]
    (tmp_path / "bad.json").write_text("{}")
    import pytest
    with pytest.raises(ValueError, match="not a campaign report"):
        recorded_schedule(tmp_path / "bad.json")
