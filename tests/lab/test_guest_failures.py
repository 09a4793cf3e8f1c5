"""A guest that fails on its own, against a real lab pool: its kernel panics (the demo
guest's "X panic"), QEMU's pvpanic device reports it, the owner restarts the guest where it
runs, at levels 1, 2 and 3, with nothing acknowledged lost; past the restart limit the VM is
left stopped, says why, and starts again when an operator asks."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import Desired, Level
from ftvm.core.protection import protection
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.lab.scenario import LabClient, LabPool, check_acked_on_disk, l3_protected, replica_current

pytestmark = pytest.mark.lab


def _ip(index: int) -> str:
    return topo.vm_addr(index).split("/")[0]


def _fail_guest_under_load(lab: labmod.LabState, pool: LabPool, name: str, ip: str, command: str):  # type: ignore[no-untyped-def]
    """With a client writing, send the demo guest `command` ("X panic", "X hang") and wait
    until the owner restarted the guest and it answers again. Returns the guest-restart
    events after the command, the acknowledged records, and when the command was sent."""
    client = LabClient(lab, ip, name, 0.02, reply_timeout=60)
    try:
        client.wait_acks(20, 30)
        sent_at = time.time()
        assert pool.ask(ip, command) == f"OK {command}"
        restarts = pool.wait_events(f"{name}'s guest restarted", lambda e: e.vm == name and e.kind == "guest-restart"
                                    and e.time > sent_at, 60)
        pool.wait_answering(ip, 120)
        client.wait_acks(20, 60, after=time.time())
    finally:
        acks = client.stop()
    return restarts, acks, sent_at


def test_a_guest_panic_restarts_the_guest_where_it_runs_at_every_level(lab: labmod.LabState, guest_image,
                                                                      tmp_path: Path) -> None:
    pool = LabPool(lab)
    vms = [("gp1", 60, Level.RESTART), ("gp2", 61, Level.COMPONENT), ("gp3", 62, Level.SYSTEM)]
    for name, index, level in vms:
        pool.define_ledger_vm(name, index, level, guest_image, host="h1")
    try:
        for name, index, level in vms:
            pool.wait_running(name, 60)
            pool.wait_answering(_ip(index), 60)
            if level is Level.COMPONENT:
                pool.wait_for(f"{name}'s replica in sync", replica_current(name), 120)
            if level is Level.SYSTEM:
                pool.wait_for(f"{name} protected", l3_protected(name), 120)
        for name, index, level in vms:
            restarts, acks, panicked_at = _fail_guest_under_load(lab, pool, name, _ip(index), "X panic")
            assert "kernel panic" in restarts[0].message and "1 of 3 restarts" in restarts[0].message
            print(f"{name} (level {int(level)}): panic -> guest reset {restarts[0].time - panicked_at:.2f} s")
            snap = pool.snapshot()
            view = snap.vms[name]
            assert view.owner is not None and view.owner.host == "h1"  # restarted where it ran
            assert view.guest is not None and len(view.guest.failures) == 1 and not view.guest.gave_up
            events = [e for e in pool.events() if e.vm == name and e.time > panicked_at]
            assert not [e for e in events if e.kind in ("takeover", "claim", "fence")], events
            if level is Level.RESTART:
                disk = Path(view.spec.disks[0].path)
            elif level is Level.COMPONENT:
                disk = pool.copy_as_raw(name, "h1", tmp_path / f"{name}.raw")
            else:
                disk = pool.copy_path(name, "h1")[0]
            on_disk, lost = check_acked_on_disk(disk, acks)
            assert lost == [] and len(acks) >= 40, (len(acks), lost)
            if level is Level.SYSTEM:  # the reset went to the replica too; protection carried on
                pool.wait_for(f"{name} protected after the restart", l3_protected(name), 60)
            if level is Level.COMPONENT:
                pool.wait_for(f"{name}'s replica in sync after the restart", replica_current(name), 60)
    finally:
        for name, _, _ in vms:
            pool.stop_and_remove(name)


def test_past_the_restart_limit_the_vm_is_left_stopped_until_an_operator_starts_it(
        lab: labmod.LabState, guest_image) -> None:
    pool = LabPool(lab)
    spec = pool.define_ledger_vm("gpl", 63, Level.RESTART, guest_image, host="h1", start=False)

    async def one_restart(store):  # type: ignore[no-untyped-def]
        got = await store.spec("gpl")
        assert got is not None
        return await store.update_spec(replace(got[0], guest_restarts=1, desired=Desired.RUNNING), got[1])
    assert pool.run(one_restart)
    ip = _ip(63)
    try:
        pool.wait_running("gpl", 60)
        pool.wait_answering(ip, 60)
        t0 = time.time()
        pool.ask(ip, "X panic")
        pool.wait_events("the first restart", lambda e: e.vm == "gpl" and e.kind == "guest-restart"
                         and e.time > t0, 60)
        pool.wait_answering(ip, 120)
        t1 = time.time()
        pool.ask(ip, "X panic")
        gave_up = pool.wait_events("giving up", lambda e: e.vm == "gpl" and e.kind == "guest-gave-up"
                                   and e.time > t1, 60)
        assert "guest failed 2 times in 1 h" in gave_up[0].message
        pool.wait_for("left stopped and released", lambda s: s.vms["gpl"].owner is None, 60)
        snap = pool.snapshot()
        view = snap.vms["gpl"]
        assert view.spec.desired is Desired.RUNNING  # the operator's wish stands; ftvm gave up on it
        assert "guest failed 2 times in 1 h" in str(protection(snap, view))
        assert not [e for e in pool.events() if e.vm == "gpl" and e.kind in ("claim", "start")
                    and e.time > gave_up[0].time]
        assert pool.run(lambda s: ops.set_desired(s, "gpl", Desired.RUNNING))  # `ftvm vm start gpl`
        pool.wait_running("gpl", 60)
        pool.wait_answering(ip, 60)
        assert pool.snapshot().vms["gpl"].guest is None
    finally:
        pool.stop_and_remove("gpl")
    del spec


PROBE = {"health": "http:8080/health", "health_interval_s": 1.0, "health_timeout_s": 1.0, "health_grace_s": 3.0}


def _probe_ok(name: str, host: str):  # type: ignore[no-untyped-def]
    """A wait_for condition: the VM runs on `host` and its last health probe there passed."""
    def check(snap) -> bool:  # type: ignore[no-untyped-def]
        view = snap.vms.get(name)
        return (view is not None and view.owner is not None and view.owner.host == host
                and view.status is not None and view.status.host == host and view.status.health.endswith(" ok"))
    return check


def test_a_hung_guest_is_caught_by_its_health_probe_and_restarted(lab: labmod.LabState, guest_image,
                                                                   tmp_path: Path) -> None:
    """The ledger stops answering ("X hang"; the guest kernel runs on, so a TCP connect would
    still succeed): its HTTP health endpoint goes unanswered, three probes in a row fail, and
    the owner restarts the guest where it runs, with nothing acknowledged lost."""
    pool = LabPool(lab)
    pool.define_ledger_vm("gh2", 64, Level.COMPONENT, guest_image, host="h1", health_failures=3, **PROBE)
    ip = _ip(64)
    try:
        pool.wait_running("gh2", 60)
        pool.wait_answering(ip, 60)
        pool.wait_for("gh2's replica in sync", replica_current("gh2"), 120)
        pool.wait_for("gh2's probe passing", _probe_ok("gh2", "h1"), 60)
        restarts, acks, hung_at = _fail_guest_under_load(lab, pool, "gh2", ip, "X hang")
        assert "health probe" in restarts[0].message and "3 probes in a row failed" in restarts[0].message
        first = [e for e in pool.events() if e.vm == "gh2" and e.kind == "health" and e.time > hung_at]
        assert first and "no answer within 1 s" in first[0].message, first
        print(f"gh2 (level 2): hang -> guest reset {restarts[0].time - hung_at:.2f} s "
              f"(probe every 1 s, timeout 1 s, 3 failures in a row)")
        view = pool.snapshot().vms["gh2"]
        assert view.owner is not None and view.owner.host == "h1"
        assert view.guest is not None and view.guest.failures[0].cause.startswith("guest health probe")
        on_disk, lost = check_acked_on_disk(pool.copy_as_raw("gh2", "h1", tmp_path / "gh2.raw"), acks)
        assert lost == [] and len(acks) >= 40, (len(acks), lost)
        pool.wait_for("gh2's probe passing after the restart", _probe_ok("gh2", "h1"), 60)
    finally:
        pool.stop_and_remove("gh2")


def test_no_false_restart_during_a_live_migration_or_a_level_change(lab: labmod.LabState, guest_image) -> None:
    """A probe that restarts at its first failure (every second, 1 s timeout) stays quiet while
    the VM moves live to the other host and is raised from level 2 to level 3 online, and
    passes again after each."""
    pool = LabPool(lab)
    pool.define_ledger_vm("gm", 65, Level.COMPONENT, guest_image, host="h1", health_failures=3, **PROBE)
    ip = _ip(65)
    try:
        pool.wait_running("gm", 60)
        pool.wait_for("gm's replica in sync", replica_current("gm"), 120)
        pool.wait_for("gm's probe passing", _probe_ok("gm", "h1"), 60)
        # Only now one failure restarts: a guest booting on a loaded machine may take longer
        # than the short grace to answer, and boot is not what this test is about.
        pool.run(lambda s: ops.set_guest_monitoring(s, "gm", {"health_failures": 1}))
        assert pool.snapshot().vms["gm"].guest is None
        t0 = time.time()
        pool.run(lambda s: ops.migrate(s, "gm", "h2"))
        pool.wait_for("gm on h2", lambda s: s.vms["gm"].owner is not None and s.vms["gm"].owner.host == "h2"
                      and s.vms["gm"].migration is None, 120)
        pool.wait_for("gm's probe passing on h2", _probe_ok("gm", "h2"), 60)
        pool.wait_for("gm's replica in sync on h2", replica_current("gm"), 120)
        pool.run(lambda s: ops.change_level(s, "gm", 3, (), False))
        pool.wait_for("gm at level 3, protected", lambda s: s.vms["gm"].spec.level is Level.SYSTEM
                      and s.vms["gm"].level_change is None and l3_protected("gm")(s), 180)
        pool.wait_for("gm's probe passing at level 3", _probe_ok("gm", "h2"), 60)
        assert pool.ask(ip, "P") == "PONG"
        restarts = [e for e in pool.events() if e.vm == "gm" and e.kind in ("guest-restart", "guest-gave-up", "health")
                    and e.time > t0]
        assert restarts == [], restarts
        assert pool.snapshot().vms["gm"].guest is None
    finally:
        pool.stop_and_remove("gm")


def test_the_serial_console_through_the_cli_follows_a_level_3_failover(lab: labmod.LabState, guest_image) -> None:
    """`ftvm vm console` (through the agents' API) reaches the demo guest's shell; the
    primary's host loses power, the partner takes over, and the same console session attaches
    again and types into the same guest, which carried on. `ftvm vm log` shows the log."""
    import os
    import subprocess
    import sys
    import threading
    pool = LabPool(lab)
    pool.define_ledger_vm("gc3", 66, Level.SYSTEM, guest_image, host="h1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTVM_")}

    def cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "ftvm", *args, "--lab-dir", str(lab.dir)]
    proc = follow = None
    try:
        pool.wait_running("gc3", 60)
        pool.wait_answering(_ip(66), 60)
        pool.wait_for("gc3 protected", l3_protected("gc3"), 120)
        proc = subprocess.Popen(cli("vm", "console", "gc3"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        out = bytearray()
        err = bytearray()

        def drain(stream, into: bytearray) -> None:  # type: ignore[no-untyped-def]
            while chunk := stream.read1(4096):
                into.extend(chunk)
        for stream, into in ((proc.stdout, out), (proc.stderr, err)):
            threading.Thread(target=drain, args=(stream, into), daemon=True).start()
        assert proc.stdin is not None

        def typed(line: bytes, expect: bytes, what: str) -> None:
            last = [0.0]

            def seen(_snap) -> bool:  # type: ignore[no-untyped-def]
                if expect in out:
                    return True
                if time.monotonic() - last[0] > 3:  # (the shell may not be there yet: typed again)
                    last[0] = time.monotonic()
                    proc.stdin.write(line)
                    proc.stdin.flush()
                return False
            pool.wait_for(what, seen, 60)
        pool.wait_for("the console attached", lambda _: b"connected to gc3" in err, 30)
        typed(b"echo ftvm-console-$((6*7))\n", b"ftvm-console-42", "the guest shell's answer")
        follow = subprocess.Popen(cli("vm", "log", "gc3", "-f"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env)
        followed, follow_err = bytearray(), bytearray()
        for stream, into in ((follow.stdout, followed), (follow.stderr, follow_err)):
            threading.Thread(target=drain, args=(stream, into), daemon=True).start()
        pool.wait_for("vm log -f showing the console's output", lambda _: b"ftvm-console-42" in followed, 30)
        labmod.fail_host(lab, "h1")
        pool.wait_running("gc3", 60, not_on="h1")
        pool.wait_for("the console attached again", lambda _: err.count(b"connected to gc3") >= 2, 60)
        typed(b"echo after-$((7*6)) $(cat /proc/uptime)\n", b"after-42", "the answer after the failover")
        # `vm log -f` went on with the new QEMU's log (the takeover's) on h2
        pool.wait_for("vm log -f following to h2", lambda _: b"after-42" in followed, 30)
        assert b"runs on h2 now" in follow_err, follow_err.decode(errors="replace")
        follow.kill()
        proc.stdin.write(b"\x1d")  # Ctrl-]: detach
        proc.stdin.flush()
        assert proc.wait(30) == 0, err.decode(errors="replace")
        assert b"detached" in err
        assert not [e for e in pool.events() if e.vm == "gc3" and e.kind == "guest-restart"]
        log = subprocess.run(cli("vm", "log", "gc3", "--all"), capture_output=True, text=True, env=env, timeout=60)
        assert log.returncode == 0 and "after-42" in log.stdout, log.stdout[-2000:] + log.stderr
    finally:
        for p in (proc, follow):
            if p is not None and p.poll() is None:
                p.kill()
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 30)
        pool.stop_and_remove("gc3")


def test_a_watchdog_that_is_no_longer_kicked_resets_the_guest(lab: labmod.LabState, guest_image,
                                                              tmp_path: Path) -> None:
    """`vm add --watchdog`: the demo ledger arms the i6300esb and kicks it from its loop; "X
    hang" stops the loop, the watchdog fires after its 5 s, QEMU resets the guest, and the
    owner records the guest failure (level 3: the partner does not take over)."""
    pool = LabPool(lab)
    pool.define_ledger_vm("gw3", 67, Level.SYSTEM, guest_image, host="h1", watchdog=True)
    ip = _ip(67)
    try:
        pool.wait_running("gw3", 60)
        pool.wait_answering(ip, 60)
        pool.wait_for("gw3 protected", l3_protected("gw3"), 120)
        serial = (lab.host_dir("h1") / "state" / "vms" / "gw3" / "serial.log").read_text(errors="replace")
        assert "i6300esb watchdog armed (5 s)" in serial, serial[-2000:]
        restarts, acks, hung_at = _fail_guest_under_load(lab, pool, "gw3", ip, "X hang")
        assert "watchdog" in restarts[0].message, restarts
        print(f"gw3 (level 3): hang -> watchdog reset recorded {restarts[0].time - hung_at:.2f} s (5 s watchdog)")
        snap = pool.snapshot()
        view = snap.vms["gw3"]
        assert view.owner is not None and view.owner.host == "h1"
        assert view.guest is not None and view.guest.failures[0].cause == "guest watchdog"
        assert not [e for e in pool.events() if e.vm == "gw3" and e.kind in ("takeover", "claim", "fence")
                    and e.time > hung_at]
        on_disk, lost = check_acked_on_disk(pool.copy_path("gw3", "h1")[0], acks)
        assert lost == [] and len(acks) >= 40, (len(acks), lost)
        pool.wait_for("gw3 protected after the reset", l3_protected("gw3"), 60)
    finally:
        pool.stop_and_remove("gw3")
