"""Level 3 pure parts: the checkpoint wire format, the epoch figures, protection, decisions."""

from __future__ import annotations

from dataclasses import replace

import asyncio

import numpy as np
import pytest

from ftvm.core.decide import Action, decide
from ftvm.core.model import (CheckpointFigures, Desired, DiskSpec, HostInfo, Level, LocalView, NicSpec, Ownership,
                             PoolSnapshot, RunState, VmSpec, VmStatus, VmView)
from ftvm.core.protection import protection
from ftvm.core.replication import CopyState, mark, new_copies, take_over
from ftvm.core.validate import check_new_vm
from ftvm.agent.l3 import is_partner
from ftvm.l3.pages import PAGE, Delta
from ftvm.l3.primary import CheckpointStats, EpochRecord
from ftvm.l3.wire import (STATE_CHUNK, Checkpoint, Msg, StatePatch, WireError, decode_checkpoint, decode_precopy,
                          encode_checkpoint, encode_precopy, read_message, standby_limits)

ANY = standby_limits([1 << 16, 1 << 16, 1 << 16])


def spec(**kw) -> VmSpec:
    base = dict(name="trade", level=Level.SYSTEM, memory_mib=256, vcpus=1, disks=(DiskSpec(size=64 << 20),),
                nics=(NicSpec("52:54:00:00:00:03"),), desired=Desired.RUNNING)
    return VmSpec(**(base | kw))


def delta(pages: list[int], fill: int) -> Delta:
    return Delta(np.array(pages, dtype=np.int64), bytes([fill]) * (PAGE * len(pages)))


def test_checkpoint_round_trips_through_the_stream() -> None:
    cp = Checkpoint(7, {0: delta([0, 5, 65535], 1), 1: delta([], 0), 2: delta([3], 9)}, b"device-state")
    async def read_two() -> list[tuple[Msg, bytes]]:
        reader = asyncio.StreamReader()
        for part in encode_checkpoint(cp) + encode_precopy(1, delta([2], 4)):
            reader.feed_data(part)
        reader.feed_eof()
        seen: list[int] = []
        first = await read_message(reader, ANY, lambda: seen.append(1))
        return [first, await read_message(reader, ANY)]

    (k1, p1), (k2, p2) = asyncio.run(read_two())
    assert (k1, k2) == (Msg.CHECKPOINT, Msg.PRECOPY)
    back = decode_checkpoint(p1)
    assert back.epoch == 7 and back.device_state == b"device-state"
    assert {i: list(d.pages) for i, d in back.deltas.items()} == {0: [0, 5, 65535], 1: [], 2: [3]}
    assert back.deltas[2].data == bytes([9]) * PAGE
    index, d = decode_precopy(p2)
    assert index == 1 and list(d.pages) == [2] and d.data == bytes([4]) * PAGE


def test_a_truncated_checkpoint_is_never_decoded() -> None:
    payload = b"".join(encode_checkpoint(Checkpoint(1, {0: delta([1, 2], 1)}, b"state"))[1:])
    with pytest.raises(WireError):
        decode_checkpoint(payload[:-3])

    async def read_torn() -> None:
        reader = asyncio.StreamReader()
        parts = encode_checkpoint(Checkpoint(1, {0: delta([1], 1)}, b"s"))
        reader.feed_data(b"".join(parts)[:-100])  # the primary died mid-message
        reader.feed_eof()
        await read_message(reader, ANY)

    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(read_torn())


def test_device_state_patches_rebuild_the_new_state_exactly() -> None:
    rng = np.random.default_rng(15)
    for _ in range(300):  # lengths around the chunk size, growing and shrinking states
        old = rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
        new = bytearray(old[:int(rng.integers(0, len(old) + 1))] + rng.bytes(int(rng.integers(0, 700))))
        for at in rng.integers(0, max(1, len(new)), int(rng.integers(0, 4))).tolist():
            if new:
                new[at] ^= 0xFF
        patch = StatePatch.between(old, bytes(new))
        payload = b"".join(encode_checkpoint(Checkpoint(3, {}, patch))[1:])
        back = decode_checkpoint(payload)
        assert isinstance(back.device_state, StatePatch)
        assert back.device_state.apply(old) == bytes(new)


def test_an_unchanged_device_state_costs_no_data_and_a_bad_patch_is_refused() -> None:
    state = bytes(range(256)) * 40  # 10 KiB, as QEMU's ROMs and unchanged devices
    changed = bytearray(state)
    changed[300] ^= 1
    assert StatePatch.between(state, state).nbytes == 0
    patch = StatePatch.between(state, bytes(changed))
    assert list(patch.chunks) == [1] and len(patch.data) == STATE_CHUNK
    good = b"".join(encode_checkpoint(Checkpoint(3, {}, patch))[1:])
    head = len(good) - len(patch.data) - 4  # (chunk index: 4 bytes)
    for bad in (good[:head] + (40).to_bytes(4, "big") + patch.data,  # past the state's end
                good[:-1],                                            # truncated
                good[:head - 8] + (41).to_bytes(8, "big") + good[head:]):  # more chunks than the state has
        with pytest.raises(WireError):
            decode_checkpoint(bad)
    two = StatePatch(len(state), np.array([2, 1]), bytes(2 * STATE_CHUNK))
    with pytest.raises(WireError, match="order"):
        decode_checkpoint(b"".join(encode_checkpoint(Checkpoint(3, {}, two))[1:]))


def test_epoch_window_breaks_the_pause_down_and_counts_run_time() -> None:
    stats = CheckpointStats()
    for i in range(10):  # one 40 ms pause every 100 ms, ending at t = 100.1 .. 101.0
        stats.records.append(EpochRecord(end=100.1 + i * 0.1, pause=0.04, stop=0.002, ram_diff=0.02,
                                         disk_diff=0.005, device_state=0.03, cont=0.002, dirty_pages=10 * i,
                                         disk_pages=1, nbytes=1000))
    w = stats.window(10, now=101.0)
    assert w["epochs"] == 10 and w["pause_p50_ms"] == 40 and w["ram_diff_p50_ms"] == 20
    assert w["per_s"] == pytest.approx(10 / 0.94, rel=0.01)
    assert w["running_fraction"] == pytest.approx(1 - 0.4 / 0.94, abs=0.01)
    assert stats.window(0.25, now=101.0)["epochs"] == 3
    assert stats.window(1, now=200.0) == {"epochs": 0, "link_bound": 0.0}


def test_output_triggered_epochs_leave_the_guest_at_least_half_of_the_time(tmp_path) -> None:
    from ftvm.l3.primary import GATHER_S, MIN_RUN_S, Checkpointer
    cp = Checkpointer("ft", None, [], tmp_path / "ram", [], tmp_path, 0.1, on_output=True)  # type: ignore[arg-type]
    assert cp.output_wait(50.0) == GATHER_S  # no checkpoint yet: just gather the reply's frames

    def after(pause: float, end: float = 100.0) -> None:
        cp.stats.records.append(EpochRecord(end=end, pause=pause, stop=0, ram_diff=0, disk_diff=0, device_state=0,
                                            cont=0, dirty_pages=0, disk_pages=0, nbytes=0))
    after(0.008)
    assert cp.output_wait(100.001) == pytest.approx(0.007)  # runs as long as it was paused
    assert cp.output_wait(100.0075) == GATHER_S             # (and always gathers)
    assert cp.output_wait(101.0) == GATHER_S                # long since: right away
    after(0.0005, end=200.0)
    assert cp.output_wait(200.0) == pytest.approx(MIN_RUN_S)  # a short pause: still MIN_RUN_S


def test_level3_protection_needs_a_current_replica_and_a_working_engine() -> None:
    copies = mark(new_copies("h1", "h2", 0.0), "h2", CopyState.CURRENT, "checkpoint 1 acknowledged", 1.0)
    running = VmStatus("h1", RunState.RUNNING, 7, 0.0)

    def prot(figures: CheckpointFigures | None, live: tuple[str, ...] = ("h1", "h2"), c=copies) -> str:
        v = VmView(spec(), owner=Ownership("h1", 7), status=running, home="h1", copies=c, checkpoints=figures)
        return str(protection(PoolSnapshot(1, {h: HostInfo(h, 1024, 4) for h in live}, {"trade": v}), v))

    good = CheckpointFigures("h2", "protected", per_s=9.5, pause_p50_ms=30)
    assert prot(good) == "Protected"
    v = VmView(spec(), owner=Ownership("h1", 7), status=running, home="h1", copies=copies, checkpoints=good)
    p = protection(PoolSnapshot(1, {h: HostInfo(h, 1024, 4) for h in ("h1", "h2")}, {"trade": v}), v)
    assert p.protected and "every 100 ms" in p.reason
    assert "partner h2 is down" in prot(good, live=("h1",))
    assert "not started" in prot(None)
    assert "first copy" in prot(CheckpointFigures("h2", "syncing", sync_done=0.4))
    lost = CheckpointFigures("h2", "unprotected", reason="replica on h2 lost: partner silent for 0.31s")
    assert "partner silent" in prot(lost, c=mark(copies, "h2", CopyState.OUTDATED, "partner lost", 2.0))
    # a link slower than the guest writes memory: still protected, and status says it degrades
    slow = CheckpointFigures("h2", "protected", per_s=4.0, link_bytes_per_s=17 << 20, link_bound=0.8,
                             link_wait_p50_ms=120, compressed=True, raw_bytes_per_s=51 << 20)
    said = prot(slow)
    assert said.startswith("Protected (degraded: the link to h2 is slower than the guest writes memory")
    assert "checkpoints waited for it 80% of the last 10 s and come 250 ms apart" in said
    assert prot(replace(slow, link_bound=0.1)) == "Protected"


def test_partner_duty_and_takeover_rules() -> None:
    copies = mark(new_copies("h1", "h2", 0.0), "h2", CopyState.CURRENT, "ok", 1.0)
    v = VmView(spec(), owner=Ownership("h1", 7), home="h1", copies=copies)
    snap = PoolSnapshot(1, {h: HostInfo(h, 1024, 4) for h in ("h1", "h2", "h3")}, {"trade": v})
    assert is_partner(snap, "h2", "trade") and not is_partner(snap, "h1", "trade")
    assert not is_partner(snap, "h3", "trade")  # holds no copy
    after = take_over(copies, "h2", 5.0)
    assert after.copies["h2"].state is CopyState.CURRENT
    assert after.copies["h1"].state is CopyState.OUTDATED and after.copies["h1"].full
    # after the takeover, with the owner gone, only h2 may claim; h1 (back, outdated) waits
    gone = PoolSnapshot(2, snap.hosts, {"trade": VmView(spec(), home="h1", copies=after)})
    acts = {h: decide(gone, LocalView(h)).decisions[0].action for h in ("h1", "h2", "h3")}
    assert acts == {"h1": Action.WAIT, "h2": Action.CLAIM, "h3": Action.WAIT}


@pytest.mark.parametrize("case, standby, copy, desired, expect", [
    ("silent primary, committed checkpoint, current copy", (9, 0.9), CopyState.CURRENT, Desired.RUNNING, True),
    ("not silent long enough", (9, 0.5), CopyState.CURRENT, Desired.RUNNING, False),
    ("no checkpoint of this session", (None, 5.0), CopyState.CURRENT, Desired.RUNNING, False),
    ("copy recorded outdated (the primary got there first)", (9, 5.0), CopyState.OUTDATED, Desired.RUNNING, False),
    ("VM being stopped", (9, 5.0), CopyState.CURRENT, Desired.STOPPED, False),
    ("no standby here", None, CopyState.CURRENT, Desired.RUNNING, False),
])
def test_a_level3_partner_takes_over_only_from_a_silent_primary_with_its_checkpoint_current(
        case: str, standby: tuple | None, copy: CopyState, desired: Desired, expect: bool) -> None:  # type: ignore[type-arg]
    from ftvm.core.model import LocalStandby
    copies = mark(new_copies("h1", "h2", 0.0), "h2", copy, "x", 1.0)
    v = VmView(spec(desired=desired), owner=Ownership("h1", 7), home="h1", copies=copies)
    snap = PoolSnapshot(1, {h: HostInfo(h, 1024, 4) for h in ("h1", "h2")}, {"trade": v})
    standbys = {"trade": LocalStandby("trade", *standby)} if standby else {}
    [d] = decide(snap, LocalView("h2", standbys=standbys), takeover_after=0.8).decisions
    assert (d.action is Action.TAKE_OVER) is expect, (case, d)
    if expect:
        assert d.token == 7 and d.failover and "h1 silent for 0.90s" in d.reason
    # the owner itself never takes over from itself, whatever its local view says
    [own] = decide(snap, LocalView("h1", standbys=standbys), takeover_after=0.8).decisions
    assert own.action is not Action.TAKE_OVER


def test_level3_validation() -> None:
    hosts = PoolSnapshot(1, {h: HostInfo(h, 4096, 4) for h in ("h1", "h2")}, {})
    ok = lambda p: True  # noqa: E731
    assert check_new_vm(spec(), hosts, ok) is None
    assert "checkpoint interval" in (check_new_vm(spec(checkpoint_ms=5), hosts, ok) or "")
    assert "NIC" in (check_new_vm(spec(nics=()), hosts, ok) or "")
    assert "4096" in (check_new_vm(spec(disks=(DiskSpec(size=(64 << 20) + 512),)), hosts, ok) or "")
    imported = spec(disks=(DiskSpec(path="/x.img", size=1 << 20),))  # a boot disk, imported into each copy
    assert check_new_vm(imported, hosts, ok) is None
    assert "does not exist" in (check_new_vm(imported, hosts, lambda p: False) or "")
    one = PoolSnapshot(1, {"h1": HostInfo("h1", 4096, 4)}, {})
    assert "partner" in (check_new_vm(spec(), one, ok) or "")


def test_closing_after_a_checkpoint_was_cancelled_mid_compare_does_not_raise(tmp_path) -> None:
    """A stop can cancel a checkpoint while its page compare runs: closing must still end
    cleanly (it once raised CancelledError, so the agent never recorded the VM stopped)."""
    from ftvm.l3.primary import Checkpointer

    class NoQmp:
        async def execute(self, cmd: str, args: dict | None = None) -> dict:
            return {}

    async def scenario() -> None:
        cp = Checkpointer("vm", NoQmp(), [], tmp_path / "ram", [], tmp_path, 0.1)
        compare = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        compare.cancel()
        cp._diff_task = compare
        await cp.close()

    asyncio.run(scenario())


def test_level3_migrates_only_to_a_partner_in_step() -> None:
    from ftvm.core.placement import migration_problem
    hs = {n: HostInfo(n, 2048, 4, replication_addr=f"10.79.0.{i}") for i, n in enumerate(("h1", "h2", "h3"), 1)}
    copies = mark(new_copies("h1", "h2", 1.0), "h2", CopyState.CURRENT, "checkpoint 1 acknowledged", 2.0)

    def view(state: str) -> VmView:
        return VmView(spec(desired=Desired.RUNNING), Ownership("h1", 5), VmStatus("h1", RunState.RUNNING, 5, 1.0),
                      home="h1", copies=copies, checkpoints=CheckpointFigures("h2", state))

    for state, problem in (("protected", None), ("syncing", "not in step (syncing)")):
        v = view(state)
        got = migration_problem(PoolSnapshot(3, hs, {v.spec.name: v}), v, "h2")
        assert got == problem if problem is None else problem in (got or ""), got
    v = view("protected")
    assert "h3 holds no copy" in (migration_problem(PoolSnapshot(3, hs, {v.spec.name: v}), v, "h3") or "")
