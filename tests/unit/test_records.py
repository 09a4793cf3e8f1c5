"""Bad data from the store: each value parsed on its own, one bad value freezes one VM.

Includes property-based fuzzing (hypothesis) of the snapshot parser: whatever bytes sit
under any key, the parser returns a snapshot, never raises, and leaves every other VM as
it was."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftvm.core.decide import Action, decide
from ftvm.core.model import (MAC_RE, NAME_RE, DiskSpec, HostInfo, Level, LocalView, LocalVm, NicSpec, RunState,
                             VmSpec, check_nic_ip, spec_problem, valid_name)
from ftvm.core.records import RecordError
from ftvm.core.replication import Copies, Copy, CopyState
from ftvm.store.etcd import EtcdClient, EtcdError, KeyValue
from ftvm.store.pool import parse_snapshot

PREFIX = "/ftvm/p/state/"
_rev = iter(range(100, 10**9))


def kv(key: str, value: object, create: int | None = None) -> KeyValue:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    rev = next(_rev)
    return KeyValue(PREFIX + key, raw, create or rev, rev, 1, 0)


def spec(name: str, level: Level = Level.COMPONENT) -> VmSpec:
    return VmSpec(name, level, 256, 1, (DiskSpec("", "raw", 1 << 20),), (NicSpec("52:54:00:00:00:01"),))


def pool_kvs() -> list[KeyValue]:
    """Two hosts; VM a running on h1 with a current copy on both; VM b stopped."""
    copies = Copies(3, {"h1": Copy(CopyState.CURRENT, 1.0), "h2": Copy(CopyState.CURRENT, 1.0)})
    return [
        kv("hosts/h1", HostInfo("h1", 2048, 4, replication_addr="10.0.0.1").to_json()),
        kv("hosts/h2", HostInfo("h2", 2048, 4, replication_addr="10.0.0.2").to_json()),
        kv("vms/a/spec", spec("a").to_json()),
        kv("vms/a/owner", {"host": "h1"}, create=42),
        kv("vms/a/home", {"host": "h1"}),
        kv("vms/a/copies", copies.to_json()),
        kv("vms/a/export/h2", {"host": "h2", "addr": "10.0.0.2", "port": 10809}),
        kv("vms/a/status", {"host": "h1", "state": "running", "token": 42, "since": 1.0}),
        kv("vms/b/spec", spec("b").to_json()),
    ]


def replaced(kvs: list[KeyValue], key: str, value: object) -> list[KeyValue]:
    out = [k for k in kvs if k.key != PREFIX + key]
    old = next((k for k in kvs if k.key == PREFIX + key), None)
    return out + [kv(key, value, create=old.create_revision if old else None)]


def test_a_good_pool_parses_whole() -> None:
    snap = parse_snapshot(PREFIX, pool_kvs(), 500)
    assert set(snap.vms) == {"a", "b"} and not snap.frozen and not snap.bad
    assert snap.vms["a"].owner is not None and snap.vms["a"].owner.token == 42
    assert snap.vms["a"].copies is not None and snap.vms["a"].copies.current_hosts() == ["h1", "h2"]


@pytest.mark.parametrize("key,value", [
    ("vms/a/spec", b"{"),
    ("vms/a/spec", {"name": "a"}),
    ("vms/a/spec", spec("a").to_json() | {"v": 2}),
    ("vms/a/spec", spec("a").to_json() | {"name": "b"}),
    ("vms/a/spec", spec("a").to_json() | {"memory_mib": "256"}),
    ("vms/a/spec", spec("a").to_json() | {"nics": [{"mac": "52:54:00:00:00:01,script=/x"}]}),
    ("vms/a/owner", b"\xff\xfe"),
    ("vms/a/owner", {"host": "../../etc"}),
    ("vms/a/copies", {"gen": 1, "copies": {"h1": {"state": "best", "since": 0}}}),
    ("vms/a/copies", {"gen": 1, "copies": []}),
    ("vms/a/export/h2", {"host": "h3", "addr": "10.0.0.2", "port": 1}),
    ("vms/a/export/h2", {"host": "h2", "addr": "10.0.0.2"}),
    ("vms/a/level", {"level": "three"}),
])
@pytest.mark.parametrize("after_a_good_one", [False, True])
def test_a_bad_decisive_record_freezes_only_its_vm(key: str, value: object, after_a_good_one: bool) -> None:
    """(`after_a_good_one`: the store's parses of the good records are kept, as each tick's
    are: the bad record is still read, and still freezes the VM.)"""
    parsed: dict = {}  # type: ignore[type-arg]
    good = pool_kvs()
    if after_a_good_one:
        assert "a" in parse_snapshot(PREFIX, good, 499, parsed).vms
    snap = parse_snapshot(PREFIX, replaced(good, key, value), 500, parsed)
    assert set(snap.frozen) == {"a"} and "a" not in snap.vms
    assert set(snap.vms) == {"b"} and set(snap.hosts) == {"h1", "h2"}
    frozen = snap.frozen["a"]
    assert frozen.problem.key == PREFIX + key and frozen.problem in snap.bad
    assert frozen.owner_token == 42  # the owner key's create_revision, even when its value is garbage


def test_unknown_fields_are_ignored_and_a_missing_version_is_version_1() -> None:
    s = spec("a").to_json() | {"colour": "blue", "disks": [{"path": "", "size": 1 << 20, "new": 1}]}
    del s["v"]
    snap = parse_snapshot(PREFIX, replaced(pool_kvs(), "vms/a/spec", s), 500)
    assert not snap.frozen and snap.vms["a"].spec.disks[0].size == 1 << 20


def test_bad_advisory_records_read_as_absent() -> None:
    kvs = replaced(pool_kvs(), "vms/a/status", {"state": 5})
    kvs.append(kv("vms/a/checkpoints", b"nope"))
    snap = parse_snapshot(PREFIX, kvs, 500)
    assert not snap.frozen and snap.vms["a"].status is None and snap.vms["a"].checkpoints is None
    assert len(snap.bad) == 2


def test_a_bad_host_record_leaves_that_host_out() -> None:
    snap = parse_snapshot(PREFIX, replaced(pool_kvs(), "hosts/h2", {"name": "h2", "memory_mib": -1.5}), 500)
    assert set(snap.hosts) == {"h1"} and len(snap.bad) == 1
    snap = parse_snapshot(PREFIX, replaced(pool_kvs(), "hosts/h2", HostInfo("h9", 1, 1).to_json()), 500)
    assert set(snap.hosts) == {"h1"}


def test_an_invalid_name_in_a_key_is_never_a_vm() -> None:
    snap = parse_snapshot(PREFIX, pool_kvs() + [kv("vms/Web\n/spec", spec("a").to_json())], 500)
    assert set(snap.vms) == {"a", "b"} and len(snap.bad) == 1


def test_frozen_vm_is_left_alone_but_the_safety_rule_holds() -> None:
    snap = parse_snapshot(PREFIX, replaced(pool_kvs(), "vms/a/copies", b"garbage"), 500)
    running = LocalView("h1", {"a": LocalVm("a", RunState.RUNNING, 42)})
    [d] = [d for d in decide(snap, running).decisions if d.vm == "a"]
    assert d.action is Action.WAIT and "copies" in d.reason
    stale = LocalView("h1", {"a": LocalVm("a", RunState.RUNNING, 41)})
    assert [d.action for d in decide(snap, stale).decisions if d.vm == "a"] == [Action.KILL]
    # no export is started or withdrawn for it on the partner
    partner = LocalView("h2", exports=frozenset({"a"}))
    assert [d.action for d in decide(snap, partner).decisions if d.vm == "a"] == [Action.WAIT]
    no_owner = parse_snapshot(PREFIX, [k for k in replaced(pool_kvs(), "vms/a/copies", b"x")
                                       if not k.key.endswith("a/owner")], 500)
    assert [d.action for d in decide(no_owner, running).decisions if d.vm == "a"] == [Action.KILL]


def test_the_agent_keeps_the_last_readable_view_of_a_frozen_vm() -> None:
    good = parse_snapshot(PREFIX, pool_kvs(), 500)
    bad = parse_snapshot(PREFIX, replaced(pool_kvs(), "vms/a/spec", b"{"), 501)
    held = bad.holding_frozen(good)
    assert held.vms["a"] == good.vms["a"] and "a" in held.frozen
    assert bad.holding_frozen(None).vms.keys() == {"b"}


def test_validators_use_full_matches() -> None:
    assert NAME_RE.fullmatch("web") and not valid_name("web\n") and not valid_name("Web")
    assert not MAC_RE.fullmatch("52:54:00:00:00:01\n")
    assert check_nic_ip("10.77.0.10/24") is None
    for bad in ("10.77.0.10", "10.77.0.300/24", "10.77.0.1/24 ftvm.x=1", "224.0.0.1/24"):
        assert check_nic_ip(bad), bad


def test_spec_paths_must_be_normalized_absolute() -> None:
    base = spec("a", Level.RESTART)
    for path in ("/srv/ftvm/shared/../../../etc/shadow", "relative.img", "/srv//x"):
        assert spec_problem(VmSpec("a", Level.RESTART, 256, 1, (DiskSpec(path),), base.nics)), path
    h = HostInfo("h1", 1, 1, ("/srv/ftvm/shared",))
    assert not h.can_reach(VmSpec("a", Level.RESTART, 256, 1, (DiskSpec("/srv/ftvm/shared/../../x"),), ()))
    assert h.can_reach(VmSpec("a", Level.RESTART, 256, 1, (DiskSpec("/srv/ftvm/shared/a.img"),), ()))


async def test_a_non_json_etcd_reply_is_an_etcd_error() -> None:
    replies = iter([httpx.Response(200, content=b"<html>proxy</html>"), httpx.Response(200, json=[1]),
                    httpx.Response(200, json={"kvs": [{"key": "%%%"}], "header": {"revision": "1"}}),
                    httpx.Response(200, json={"header": {}})])
    transport = httpx.MockTransport(lambda request: next(replies))
    async with EtcdClient(["http://127.0.0.1:1"], transport=transport) as etcd:
        for _ in range(3):
            with pytest.raises(EtcdError):
                await etcd.get_prefix("/x")
        with pytest.raises(EtcdError):
            await etcd.put("/x", b"1")


# --- fuzzing ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
KEYS = [k.key[len(PREFIX):] for k in pool_kvs()] + ["vms/a/migration", "vms/a/incoming", "vms/a/level",
                                                     "vms/a/force", "links/h1", "vms/a/sync"]


def mutate(d: object, data: st.DataObject) -> object:
    """A valid record with one field replaced, added or removed (closer to real damage
    than random JSON)."""
    if not isinstance(d, dict) or not d:
        return data.draw(json_values)
    d = dict(d)
    key = data.draw(st.sampled_from(sorted(d) + ["extra"]))
    if data.draw(st.booleans()):
        d.pop(key, None)
    else:
        d[key] = data.draw(json_values)
    return d


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_any_value_under_any_key_never_stops_the_parse(data: st.DataObject) -> None:
    kvs = pool_kvs()
    touched = set()
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(KEYS))
        touched.add(key)
        old = next((k for k in kvs if k.key == PREFIX + key), None)
        how = data.draw(st.sampled_from(["json", "mutate", "bytes"]))
        if how == "bytes":
            new: object = data.draw(st.binary(max_size=40))
        elif how == "mutate" and old is not None:
            try:
                new = mutate(json.loads(old.value), data)
            except ValueError:  # an earlier draw left bytes there
                new = data.draw(json_values)
        else:
            new = data.draw(json_values)
        kvs = replaced(kvs, key, new)
    snap = parse_snapshot(PREFIX, kvs, 500)  # never raises
    assert set(snap.vms) | set(snap.frozen) <= {"a", "b"}
    assert not set(snap.vms) & set(snap.frozen)
    if not any(k.startswith("vms/b/") for k in touched):
        assert "b" in snap.vms  # one VM's bad records never touch another's
    for view in snap.vms.values():  # whatever was accepted is usable
        assert spec_problem(view.spec) is None
        VmSpec.from_json(view.spec.to_json())
    for name in ("a", "b"):
        local = LocalView("h1", {name: LocalVm(name, RunState.RUNNING, 42)})
        decide(snap, local, 60.0)  # the decision core copes with whatever the parser let through


@settings(max_examples=1500, deadline=None)
@given(json_values)
def test_fuzz_spec_parser_gives_a_spec_or_a_record_error(d: object) -> None:
    try:
        s = VmSpec.from_json(d)
    except RecordError as e:
        assert str(e)
    else:
        assert spec_problem(s) is None


# --- host.toml -------------------------------------------------------------------------

GOOD_CONFIG = {"name": "h1", "pool": "p", "etcd": ["http://127.0.0.1:2379"], "state_dir": "/tmp/x",
               "bridge": "br0", "memory_mib": 1024, "vcpus": 2}
toml_values = st.recursive(
    st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_fuzz_host_config_gives_a_config_or_a_config_error(data: st.DataObject) -> None:
    from ftvm.agent.config import _KNOWN, AgentConfig, ConfigError, parse_config
    cfg = dict(GOOD_CONFIG)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(_KNOWN | {"timing", "bogus"})))
        if data.draw(st.booleans()) and key in cfg:
            del cfg[key]
        else:
            cfg[key] = data.draw(toml_values)
    try:
        got = parse_config(cfg)
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(got, AgentConfig) and valid_name(got.name)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_host_config_file_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    from ftvm.agent.config import ConfigError, load_config
    path = tmp_path_factory.mktemp("cfg") / "host.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_agent_resolves_paths_and_refuses_escapes(tmp_path) -> None:
    from ftvm.agent.paths import PathRefused, resolved_spec
    from ftvm.core.model import BootSpec
    shared, images, outside = tmp_path / "shared", tmp_path / "images", tmp_path / "secret"
    for d in (shared, images, outside):
        d.mkdir()
    (outside / "shadow").write_text("x")
    (shared / "link.img").symlink_to(outside / "shadow")
    (shared / "ok.img").write_text("")
    (images / "vmlinuz").write_text("")
    roots = (str(shared),), (str(images),)
    ok = VmSpec("a", Level.RESTART, 256, 1, (DiskSpec(str(shared / "ok.img")),), (),
                boot=BootSpec(str(images / "vmlinuz")))
    assert resolved_spec(ok, *roots).disks[0].path == str(shared / "ok.img")
    for bad in (VmSpec("a", Level.RESTART, 256, 1, (DiskSpec(str(shared / "link.img")),), ()),
                VmSpec("a", Level.RESTART, 256, 1, (DiskSpec(str(images / "vmlinuz")),), ()),  # L1: shared only
                VmSpec("a", Level.UNPROTECTED, 256, 1, (), (), boot=BootSpec(str(outside / "shadow")))):
        with pytest.raises(PathRefused):
            resolved_spec(bad, *roots)


def test_stop_force_round_trips_and_older_specs_read_as_a_graceful_stop() -> None:
    from dataclasses import replace
    forced = replace(spec("web"), stop_force=True)
    assert VmSpec.from_json(json.loads(json.dumps(forced.to_json()))).stop_force is True
    older = spec("web").to_json()
    del older["stop_force"]  # written by an agent that did not know the field
    assert VmSpec.from_json(older).stop_force is False
    with pytest.raises(RecordError):
        VmSpec.from_json(forced.to_json() | {"stop_force": "yes"})
