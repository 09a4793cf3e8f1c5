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


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    from ftvm.pki import init_pool
    init_pool(tmp_path / "pki", "prod", ["192.0.2.10"], {"node1": "192.0.2.21"})  # as the docs say
    text = (Path(__file__).parents[2] / "etc" / "host.toml.example").read_text()
    (tmp_path / "host.toml").write_text(text.replace("/etc/ftvm/", str(tmp_path / "pki") + "/"))
    cfg = load_config(tmp_path / "host.toml")
    assert cfg.timing.violations() == [] and len(cfg.pool_secret) == 32
    assert cfg.etcd_tls is not None and cfg.api_tls is not None and cfg.api_read_token != cfg.api_token


def test_the_pool_secret_must_be_private(tmp_path: Path) -> None:
    from ftvm.secret import make_secret
    secret = tmp_path / "pool.secret"
    make_secret(secret)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        make_secret(secret)  # never replaced: every host holds it
    with pytest.raises(ConfigError, match="replication_addr needs pool_secret_file"):
        parse_config(BASE | {"replication_addr": "10.0.0.1"})
    assert parse_config(BASE | {"replication_addr": "10.0.0.1", "pool_secret_file": str(secret)}).pool_secret
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        parse_config(BASE | {"pool_secret_file": str(secret)})


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
    api = BASE | {"api_listen": "127.0.0.1:7400", "api_token_file": str(good)}
    with pytest.raises(ConfigError, match="api_cert"):  # https only
        parse_config(api)
    from ftvm.pki import init_pool
    init_pool(tmp_path / "pki", "lab", ["127.0.0.1"], {"h1": "127.0.0.1"})
    api |= {"api_cert": str(tmp_path / "pki/hosts/h1.crt"), "api_key": str(tmp_path / "pki/hosts/h1.key")}
    with pytest.raises(ConfigError, match="api_read_token_file"):
        parse_config(api)
    with pytest.raises(ConfigError, match="must differ"):
        parse_config(api | {"api_read_token_file": str(good)})
    cfg = parse_config(api | {"api_read_token_file": str(tmp_path / "pki/api-read-token")})
    assert cfg.api_listen == ("127.0.0.1", 7400) and cfg.api_token == "0123456789abcdef0123"
    assert cfg.api_read_token and cfg.api_tls is not None


def test_etcd_is_reached_over_https_with_a_client_certificate(tmp_path: Path) -> None:
    from ftvm.pki import init_pool
    with pytest.raises(ConfigError, match="plain http"):
        parse_config(BASE | {"etcd": ["http://10.0.0.5:2379"]})
    with pytest.raises(ConfigError, match="etcd_ca, etcd_cert and etcd_key"):
        parse_config(BASE | {"etcd": ["https://10.0.0.5:2379"]})
    init_pool(tmp_path / "pki", "lab", ["10.0.0.5"], {"h1": "10.0.0.1"})
    cfg = parse_config(BASE | {"etcd": ["https://10.0.0.5:2379"], "etcd_ca": str(tmp_path / "pki/ca.crt"),
                               "etcd_cert": str(tmp_path / "pki/hosts/h1.crt"),
                               "etcd_key": str(tmp_path / "pki/hosts/h1.key")})
    assert cfg.etcd_tls is not None
    with pytest.raises(ConfigError, match="cannot load"):
        parse_config(BASE | {"etcd": ["https://10.0.0.5:2379"], "etcd_ca": str(tmp_path / "pki/ca.crt"),
                             "etcd_cert": str(tmp_path / "pki/hosts/h1.crt"),
                             "etcd_key": str(tmp_path / "pki/admin.key")})  # not the certificate's key
    from ftvm.pki import PkiError
    with pytest.raises(PkiError, match="already holds"):
        init_pool(tmp_path / "pki", "lab", [], {})
