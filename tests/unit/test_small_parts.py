"""Unit tests of the small pure pieces: validation, QEMU command line, ledger format, topology."""

from __future__ import annotations

import json

from pathlib import Path

from ftvm.core.model import BootSpec, DiskSpec, HostInfo, Level, NicSpec, PoolSnapshot, VmSpec, VmView
from ftvm.core.validate import check_mac, check_new_vm
from ftvm.guest.ledger_format import decode, encode, read_records
from ftvm.lab import topology as topo
from ftvm.qemu.cmdline import VmPaths, build_cmdline, tap_name
from ftvm.qemu.probe import Accel

POOL = PoolSnapshot(1, {"h1": HostInfo("h1", 1024, 2, ("/shared",), image_roots=("/local",))}, {})


def vm(**kw) -> VmSpec:
    base = dict(name="web", level=Level.RESTART, memory_mib=256, vcpus=1, disks=(DiskSpec("/shared/w.img"),),
                nics=(NicSpec("52:54:00:00:00:01"),))
    return VmSpec(**(base | kw))


def exists(path: str) -> bool:
    return path.startswith("/shared/") or path == "/k"


def test_valid_vm_passes() -> None:
    assert check_new_vm(vm(), POOL, exists) is None


def test_each_bad_input_is_named() -> None:
    cases = [
        (vm(name="Web!"), "invalid VM name"),
        (vm(memory_mib=4096), "larger than any host"),
        (vm(vcpus=8), "more than any host"),
        (vm(disks=(DiskSpec("/shared/missing.img"),)), None),  # exists() says yes
        (vm(disks=(DiskSpec("/elsewhere/w.img"),)), "does not exist"),
        (vm(nics=(NicSpec("52:54:00:00:00"),)), "malformed MAC"),
        (vm(nics=(NicSpec("01:00:5e:00:00:01"),)), "multicast"),
        (vm(boot=BootSpec("/nokernel")), "kernel /nokernel does not exist"),
        (vm(preferred_host="h9"), "h9"),
    ]
    for spec, words in cases:
        problem = check_new_vm(spec, POOL, exists)
        assert (problem is None) if words is None else (words in (problem or "")), (spec, problem)


def test_level1_requires_shared_storage() -> None:
    problem = check_new_vm(vm(disks=(DiskSpec("/local/w.img"),)), POOL, lambda p: True)
    assert problem and "shared storage" in problem
    assert check_new_vm(vm(level=Level.UNPROTECTED, disks=(DiskSpec("/local/w.img"),)), POOL,
                        lambda p: True) is None
    # level 0 disks and boot files: under some host's shared storage or image roots, once normalized
    for spec in (vm(level=Level.UNPROTECTED, disks=(DiskSpec("/etc/shadow"),)),
                 vm(boot=BootSpec("/root/k")), vm(disks=(DiskSpec("/shared/../etc/shadow"),))):
        problem = check_new_vm(spec, POOL, lambda p: True)
        assert problem and ("roots" in problem or "shared storage" in problem or "normalized" in problem), problem


def test_duplicate_name_and_mac() -> None:
    pool = PoolSnapshot(1, POOL.hosts, {"web": VmView(vm())})
    assert "already exists" in (check_new_vm(vm(), pool, exists) or "")
    assert "already used" in (check_new_vm(vm(name="db"), pool, exists) or "")


def test_check_mac() -> None:
    assert check_mac("52:54:00:ab:cd:ef") is None
    assert check_mac("52:54:00:AB:CD:EF")  # uppercase is refused, not silently changed


def test_cmdline_has_identity_disk_and_net() -> None:
    spec = vm(boot=BootSpec("/k", None, "console=ttyS0"), nics=(NicSpec("52:54:00:00:00:01", "10.0.0.5/24"),))
    cmd = build_cmdline(spec, VmPaths(Path("/run/x")), Accel("tcg", "qemu64", ""), ["ft-web"])
    line = " ".join(cmd)
    assert "guest=web," in line and "-accel tcg" in line
    nodes = [json.loads(cmd[i + 1]) for i, a in enumerate(cmd) if a == "-blockdev"]
    # the image under a raw top node disk0 (so an online level change can re-point it), O_DIRECT
    assert nodes[-1] == {"driver": "raw", "node-name": "disk0", "file": "d0-img0"}
    assert nodes[0]["file"]["filename"] == "/shared/w.img" and nodes[0]["file"]["cache"]["direct"] is True
    assert "mac=52:54:00:00:00:01" in line and "ifname=ft-web" in line
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 ftvm.ip=10.0.0.5/24"
    assert "bootindex" not in line  # direct kernel boot: no disk boot index


def test_tap_names_fit_ifnamsiz_and_never_collide() -> None:
    assert tap_name("web") == "ft-web" and tap_name("web", 1) == "ft-web.1"
    assert tap_name("web", 1) != tap_name("web1")  # they were both ft-web1
    names = ["web", "web1", "a" * 10, "a" * 11, "a" * 12, "a" * 13, "a-very-long-vm-name-indeed", "x"]
    taps = [tap_name(n, i) for n in names for i in range(8)]
    assert len(set(taps)) == len(taps) and all(len(t) <= 15 for t in taps)


def test_ledger_records_roundtrip(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(64 * 512)
        for seq in (1, 2, 3):
            f.seek(seq * 512)
            f.write(encode(seq, f"rec{seq}".encode()))
        f.seek(5 * 512)
        f.write(encode(5, b"after a gap"))  # not reachable: recovery stops at the first gap
    recs = read_records(img)
    assert [r.payload for r in recs] == [b"rec1", b"rec2", b"rec3"]
    sector = bytearray(encode(7, b"x"))
    sector[30] ^= 1
    assert decode(bytes(sector), 7) is None  # checksum catches a flipped bit
    assert decode(encode(7, b"x"), 8) is None  # wrong place


def test_topology_addresses_are_distinct() -> None:
    hosts = topo.host_names(4)
    links = topo.a_links(hosts)
    assert len(links) == 6 * topo.A_LINKS_PER_PAIR
    addrs = [link.addr(side) for link in links for side in (link.a, link.b)]
    assert len(set(addrs)) == len(addrs)
    names = [(side, link.ifname(side)) for link in links for side in (link.a, link.b)]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 15 for _, n in names)


def test_disk_boot_when_no_kernel_given() -> None:
    cmd = build_cmdline(vm(), VmPaths(Path("/run/x")), Accel("tcg", "qemu64", ""), ["ft-web"])
    assert "-kernel" not in cmd
    assert "virtio-blk-pci,drive=disk0,queue-size=64,bootindex=0" in cmd


def test_the_watchdog_device_and_the_console_socket_on_the_command_line() -> None:
    from dataclasses import replace
    paths = VmPaths(Path("/run/x"))
    plain = build_cmdline(vm(), paths, Accel("tcg", "qemu64", ""), ["ft-web"])
    assert "i6300esb" not in plain
    cmd = build_cmdline(replace(vm(), watchdog=True), paths, Accel("tcg", "qemu64", ""), ["ft-web"])
    assert cmd[cmd.index("i6300esb") - 1] == "-device" and "watchdog=reset" in cmd
    serial = cmd[cmd.index("-serial") - 1]
    assert serial == "socket,id=ser0,path=/run/x/console.sock,server=on,wait=off,logfile=/run/x/serial.log"


def test_ledger_records_at_an_offset(tmp_path: Path) -> None:
    img = tmp_path / "boot.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
        f.seek(4096 + 512)
        f.write(encode(1, b"in partition 2"))
    assert read_records(img) == [] and [r.payload for r in read_records(img, 4096)] == [b"in partition 2"]


def test_guest_cache_key_follows_every_input(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from ftvm.guest import build
    src = tmp_path / "src"
    shutil.copytree(build.GUEST_SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build, "GUEST_SRC", src)
    base = build.input_digest("linux-image-x", "1")
    assert build.input_digest("linux-image-x", "1") == base
    assert build.input_digest("linux-image-x", "2") != base
    (src / "ledger.c").write_text((src / "ledger.c").read_text() + "\n/* changed */\n")
    assert build.input_digest("linux-image-x", "1") != base


def test_guest_cache_keeps_builds_in_use_and_prunes_only_stale_ones(tmp_path) -> None:
    """Another checkout's guest build may be booting: only builds unused for a week go."""
    import os
    from ftvm.guest.build import KEEP_UNUSED_DAYS, prune_unused
    now = 1_000_000_000.0
    builds = {}
    for name, age_days in (("mine", 30), ("other-checkout", 1), ("stale", KEEP_UNUSED_DAYS + 1)):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text("{}")
        os.utime(d / "manifest.json", (now - age_days * 86400,) * 2)
        builds[name] = d
    (tmp_path / "tmpbuild").mkdir()  # a build under way has no manifest yet
    removed = prune_unused(tmp_path, keep=builds["mine"], now=now)
    assert removed == [builds["stale"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "other-checkout", "tmpbuild"]


def test_write_trace_counts_guest_writes_and_reads_back_evenly_spaced(tmp_path) -> None:
    from ftvm.agent.write_trace import _written, read_trace
    from ftvm.core.dr_model import parse_trace
    stats = [{"device": "", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
              "stats": {"wr_bytes": 4096}},
             {"device": "", "qdev": "", "stats": {"wr_bytes": 999}},  # (a node without a device: not the guest's)
             {"device": "", "qdev": "/machine/peripheral-anon/device[2]/virtio-backend", "stats": {"wr_bytes": 10}}]
    assert _written(stats) == 4106
    f = tmp_path / "web.csv"
    f.write_text("1000,5\n1001,7\n1004,9\ngarbage\n1005,1\n")  # (stopped for two seconds: zeros there)
    text = read_trace(f, 86400)
    assert text == "0,5\n1,7\n2,0\n3,0\n4,9\n5,1\n"
    trace = parse_trace(text)
    assert trace.interval_s == 1.0 and trace.written == (5, 7, 0, 0, 9, 1)
    assert read_trace(f, 2) == "0,9\n1,1\n" and read_trace(tmp_path / "none.csv", 10) == ""
