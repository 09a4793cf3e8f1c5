"""The store contract (store/pool.py) against a real etcd: atomicity, leases, fencing tokens."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import pytest

from ftvm.core.model import DiskSpec, HostInfo, Level, NicSpec, RunState, VmSpec, VmStatus
from ftvm.store.etcd import EtcdClient, EtcdUnavailable
from ftvm.store.pool import Event, PoolStore

_pools = itertools.count()


@pytest.fixture(params=["etcd", "model"])
async def store(request: pytest.FixtureRequest, etcd_url: str):
    """Each test runs against a real etcd, and against the simulator's model of it
    (sim/memetcd.py): the model must keep the same contract."""
    if request.param == "model":
        import time

        from ftvm.sim.memetcd import MemEtcd, SimEtcdClient
        async with SimEtcdClient(MemEtcd(time.monotonic)) as client:
            yield PoolStore(client, f"t{next(_pools)}")
        return
    async with EtcdClient([etcd_url], timeout=5.0) as client:
        yield PoolStore(client, f"t{next(_pools)}")


def vm(name: str = "web") -> VmSpec:
    return VmSpec(name, Level.RESTART, 256, 1, (DiskSpec("/s/w.img"),), (NicSpec("52:54:00:00:00:01"),))


async def live_host(store: PoolStore, name: str, ttl: float = 5) -> int:
    lease, _ = await store.etcd.lease_grant(ttl)
    assert await store.register_host(HostInfo(name, 1024, 2, ("/s",)), lease)
    return lease


async def test_define_is_create_only(store: PoolStore) -> None:
    assert await store.define_vm(vm())
    assert not await store.define_vm(replace(vm(), memory_mib=512))
    spec, _ = await store.spec("web")
    assert spec.memory_mib == 256


async def test_only_one_of_many_concurrent_claims_wins(store: PoolStore) -> None:
    await store.define_vm(vm())
    leases = {h: await live_host(store, h) for h in ("h1", "h2", "h3")}
    tokens = await asyncio.gather(*(store.claim("web", h, leases[h]) for h in leases))
    winners = [t for t in tokens if t is not None]
    assert len(winners) == 1
    snap = await store.snapshot()
    assert snap.vms["web"].owner is not None and snap.vms["web"].owner.token == winners[0]


async def test_host_without_live_lease_cannot_claim(store: PoolStore) -> None:
    await store.define_vm(vm())
    lease = await live_host(store, "h1")
    await store.etcd.lease_revoke(lease)
    assert await store.claim("web", "h1", lease) is None


async def test_lease_expiry_releases_ownership_and_status(store: PoolStore) -> None:
    await store.define_vm(vm())
    lease = await live_host(store, "h1", ttl=1)
    token = await store.claim("web", "h1", lease)
    assert token is not None
    assert await store.report_status("web", VmStatus("h1", RunState.RUNNING, token, 0.0), lease)
    await asyncio.sleep(3.5)  # etcd's minimum TTL and expiry checks are coarse
    snap = await store.snapshot()
    assert "h1" not in snap.hosts
    assert snap.vms["web"].owner is None and snap.vms["web"].status is None
    assert snap.vms["web"].home == "h1"  # remembered, not lease-bound


async def test_stale_token_cannot_write_status_or_release(store: PoolStore) -> None:
    await store.define_vm(vm())
    l1 = await live_host(store, "h1")
    old = await store.claim("web", "h1", l1)
    assert old is not None and await store.release("web", old)
    l2 = await live_host(store, "h2")
    new = await store.claim("web", "h2", l2)
    assert new is not None and new != old
    assert not await store.report_status("web", VmStatus("h1", RunState.RUNNING, old, 0.0), l1)
    assert not await store.release("web", old)
    snap = await store.snapshot()
    assert snap.vms["web"].owner.host == "h2"


async def test_register_refuses_a_second_live_agent(store: PoolStore) -> None:
    await live_host(store, "h1")
    other, _ = await store.etcd.lease_grant(5)
    assert not await store.register_host(HostInfo("h1", 1024, 2), other)


async def test_remove_refused_while_owned(store: PoolStore) -> None:
    await store.define_vm(vm())
    lease = await live_host(store, "h1")
    token = await store.claim("web", "h1", lease)
    _, rev = await store.spec("web")
    assert not await store.remove_vm("web", rev)
    assert await store.release("web", token)
    assert await store.remove_vm("web", rev)
    assert "web" not in (await store.snapshot()).vms


async def test_update_spec_is_compare_and_set(store: PoolStore) -> None:
    await store.define_vm(vm())
    _, rev = await store.spec("web")
    assert await store.update_spec(replace(vm(), memory_mib=300), rev)
    assert not await store.update_spec(replace(vm(), memory_mib=400), rev)


async def test_events_keep_order(store: PoolStore) -> None:
    for i in range(3):
        await store.add_event(Event(1000.0 + i, "h1", "web", "kind", f"m{i}"))
    events, rev = await store.events()
    assert [e.message for e in events] == ["m0", "m1", "m2"]
    assert [e.message for e in (await store.events(limit=2))[0]] == ["m1", "m2"]  # the newest, in order
    await store.add_event(Event(1003.0, "h1", "web", "kind", "m3"))
    assert [e.message for e in (await store.events(since_revision=rev))[0]] == ["m3"]


async def test_watch_sees_changes(store: PoolStore) -> None:
    _, rev = await store.etcd.get_prefix(store.state)

    async def first_batch():
        async for batch in store.etcd.watch_prefix(store.state, rev + 1):
            return batch

    task = asyncio.create_task(first_batch())
    await asyncio.sleep(0.2)
    await store.define_vm(vm())
    batch = await asyncio.wait_for(task, 5)
    assert batch[0].kv.key.endswith("/vms/web/spec")


async def test_unreachable_endpoint_is_reported_as_such() -> None:
    async with EtcdClient(["http://127.0.0.1:9"], timeout=0.5) as c:
        with pytest.raises(EtcdUnavailable):
            await c.get("x")


async def test_trim_keeps_the_newest_events(store: PoolStore, monkeypatch) -> None:
    import ftvm.store.pool as pool_mod
    monkeypatch.setattr(pool_mod, "MAX_EVENTS", 3)
    for i in range(5):
        await store.add_event(Event(2000.0 + i, "h1", "web", "kind", f"e{i}"))
    assert await store.trim_events() == 2
    assert [e.message for e in (await store.events())[0]] == ["e2", "e3", "e4"]


async def _level3_pair(store: PoolStore) -> tuple[int, int, int]:
    """A level 3 VM owned by h1 (both leases live) whose replica on h2 is current."""
    from ftvm.core.replication import CopyState, mark, new_copies
    spec = replace(vm("l3"), level=Level.SYSTEM, disks=(DiskSpec(size=1 << 20),))
    await store.define_vm(spec)
    l1, l2 = await live_host(store, "h1"), await live_host(store, "h2")
    token = await store.claim("l3", "h1", l1, None, new_copies("h1", "h2", 0.0))
    assert token is not None
    seen = await store.get_copies("l3")
    assert seen is not None
    assert await store.set_copies("l3", token, seen, mark(seen, "h2", CopyState.CURRENT, "ack 1", 1.0))
    return token, l1, l2


async def test_level3_takeover_and_partner_lost_race_has_one_winner(store: PoolStore) -> None:
    """The primary recording 'partner lost' and the partner taking over, both from the same
    copies record: exactly one wins, whichever order etcd sees them in."""
    from ftvm.core.replication import CopyState, mark, take_over
    token, l1, l2 = await _level3_pair(store)
    seen = await store.get_copies("l3")
    assert seen is not None
    lost, took = await asyncio.gather(
        store.set_copies("l3", token, seen, mark(seen, "h2", CopyState.OUTDATED, "partner lost", 2.0)),
        store.take_over("l3", token, seen, take_over(seen, "h2", 2.0)))
    assert (lost is not None) != took
    snap = await store.snapshot()
    view = snap.vms["l3"]
    if took:  # the old owner's ownership ended while its lease lives; its token is dead
        assert view.owner is None and view.copy_state("h2") is CopyState.CURRENT
        assert view.copy_state("h1") is CopyState.OUTDATED
        assert not await store.report_status("l3", VmStatus("h1", RunState.RUNNING, token, 0.0), l1)
        new = await store.claim("l3", "h2", l2)
        assert new is not None and new != token
    else:
        assert view.owner is not None and view.owner.token == token
        assert view.copy_state("h2") is CopyState.OUTDATED


async def test_level3_takeover_needs_the_owner_it_saw(store: PoolStore) -> None:
    from ftvm.core.replication import take_over
    token, _, _ = await _level3_pair(store)
    seen = await store.get_copies("l3")
    assert seen is not None
    assert not await store.take_over("l3", token + 1000, seen, take_over(seen, "h2", 2.0))
    snap = await store.snapshot()
    assert snap.vms["l3"].owner is not None and snap.vms["l3"].owner.token == token


async def test_update_copies_retries_a_concurrent_change_and_stops_at_a_lost_token(store: PoolStore,
                                                                                   monkeypatch) -> None:
    """The owner's read-modify-write of the copies record: a change made by someone else
    between its read and its write is re-read and the change applied on top of it; a
    change of None writes nothing; once the token is dead it raises OwnershipLost and
    writes nothing."""
    from ftvm.core.replication import CopyState, mark, take_over
    from ftvm.store.pool import OwnershipLost
    token, _, _ = await _level3_pair(store)
    real_set = store.set_copies
    seen_by_change = []

    async def set_after_someone_else(vm, tok, seen, new):  # type: ignore[no-untyped-def]
        if len(seen_by_change) == 1:  # the first attempt: another writer gets in first
            assert await real_set(vm, tok, seen, mark(seen, "h1", CopyState.CURRENT, "meanwhile", 2.0))
        return await real_set(vm, tok, seen, new)

    def outdate(seen):  # type: ignore[no-untyped-def]
        seen_by_change.append(seen)
        return mark(seen, "h2", CopyState.OUTDATED, "partner lost", 3.0)

    monkeypatch.setattr(store, "set_copies", set_after_someone_else)
    result = await store.update_copies("l3", token, outdate)
    monkeypatch.setattr(store, "set_copies", real_set)
    assert len(seen_by_change) == 2  # re-read after the compare failed
    assert result.state_of("h2").state is CopyState.OUTDATED  # type: ignore[union-attr]
    assert result.state_of("h1").reason == "meanwhile"  # type: ignore[union-attr]  # applied on top
    assert (await store.update_copies("l3", token, lambda s: None)).revision == result.revision
    fresh = await store.get_copies("l3")
    assert fresh is not None and await store.take_over("l3", token, fresh, take_over(fresh, "h2", 4.0))
    before = await store.get_copies("l3")
    with pytest.raises(OwnershipLost):
        await store.update_copies("l3", token, lambda s: mark(s, "h2", CopyState.OUTDATED, "too late", 5.0))
    assert await store.get_copies("l3") == before


async def test_revoking_a_lease_etcd_forgot_is_not_an_error(store: PoolStore) -> None:
    """Told apart by etcd's status code (NOT_FOUND), not by its wording."""
    from ftvm.store.etcd import GRPC_NOT_FOUND, EtcdError
    lease, _ = await store.etcd.lease_grant(5)
    await store.etcd.lease_revoke(lease)
    await store.etcd.lease_revoke(lease)  # again: already gone
    with pytest.raises(EtcdError) as e:
        await store.etcd._post("/v3/lease/revoke", {"ID": "not-a-number"})
    assert e.value.code != GRPC_NOT_FOUND


async def test_a_host_s_lease_shows_whether_it_was_renewed_lately(store: PoolStore) -> None:
    """SplitSite tells a cut from a lost site by whether the partner still renews its lease
    (core/sites.py, agent/replica.py)."""
    from ftvm.core.sites import renewed_since
    lease = await live_host(store, "h2")
    left, granted = await store.host_lease_left("h2") or (0, 0)
    assert granted == 5 and renewed_since(left, granted, 2.0)
    await asyncio.sleep(2.1)  # no keepalive meanwhile
    left, granted = await store.host_lease_left("h2") or (0, 0)
    assert not renewed_since(left, granted, 2.0)
    await store.etcd.lease_keepalive(lease)
    left, granted = await store.host_lease_left("h2") or (0, 0)
    assert renewed_since(left, granted, 2.0)
    assert await store.host_lease_left("nobody") is None
