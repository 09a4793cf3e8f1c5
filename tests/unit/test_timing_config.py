from __future__ import annotations

from pathlib import Path

import pytest

from ftvm.agent.config import ConfigError, load_config, parse_config
from ftvm.core.timing import Timing, TimingError

BASE = {"name": "h1", "pool": "lab", "etcd": ["http://127.0.0.1:2379"], "state_dir": "/tmp/x",
        "bridge": "br0", "memory_mib": 1024, "vcpus": 2}


def test_defaults_are_consistent() -> None:
    assert Timing().violations() == []


@pytest.mark.parametrize("change, words", [
    ({"lease_ttl": 2.0}, "keepalive"),
    ({"self_fence_margin": 0.3}, "outlive"),
    ({"tick": 4.0}, "tick"),
    ({"lease_ttl": 0.0}, "> 0"),
])
def test_broken_invariants_are_named(change: dict[str, float], words: str) -> None:
    with pytest.raises(TimingError, match=words):
        Timing.from_dict(change)


def test_unknown_timing_key_rejected() -> None:
    with pytest.raises(TimingError, match="lease_tll"):
        Timing.from_dict({"lease_tll": 5})


def test_config_parses_and_checks() -> None:
    cfg = parse_config(BASE | {"shared_storage": ["/srv/shared/"], "timing": {"lease_ttl": 8}})
    assert cfg.timing.lease_ttl == 8 and cfg.shared_storage == ("/srv/shared",)
    for bad, msg in [({"name": "H 1"}, "name"), ({"etcd": ["10.0.0.1"]}, "etcd"),
                     ({"accel": "xen"}, "accel"), ({"memory_mib": 0}, "memory_mib"),
                     ({"colour": 1}, "unknown"), ({"timing": {"lease_ttl": 1}}, "timing invariant")]:
        with pytest.raises(ConfigError, match=msg):
            parse_config(BASE | bad)
    with pytest.raises(ConfigError, match="missing"):
        parse_config({"name": "h1"})


def test_write_through_copies_is_on_unless_turned_off() -> None:
    assert parse_config(BASE).write_through_copies
    assert not parse_config(BASE | {"write_through_copies": False}).write_through_copies
    with pytest.raises(ConfigError, match="write_through_copies must be true or false"):
        parse_config(BASE | {"write_through_copies": "yes"})


def test_shipped_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "etc" / "host.toml.example")
    assert cfg.timing.violations() == []


def test_bad_toml_names_file(tmp_path: Path) -> None:
    p = tmp_path / "host.toml"
    p.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_api_settings_need_a_readable_long_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_token_file"):
        parse_config(BASE | {"api_listen": "127.0.0.1:7400"})
    with pytest.raises(ConfigError, match="ADDRESS:PORT"):
        parse_config(BASE | {"api_listen": "7400", "api_token_file": "/x"})
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(BASE | {"api_listen": "127.0.0.1:7400", "api_token_file": str(tmp_path / "none")})
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="too short"):
        parse_config(BASE | {"api_listen": "127.0.0.1:7400", "api_token_file": str(short)})
    good = tmp_path / "token"
    good.write_text("0123456789abcdef0123\n")
    cfg = parse_config(BASE | {"api_listen": "127.0.0.1:7400", "api_token_file": str(good)})
    assert cfg.api_listen == ("127.0.0.1", 7400) and cfg.api_token == "0123456789abcdef0123"
