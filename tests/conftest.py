"""Shared fixtures: a real etcd on loopback, and a real lab pool."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway single-node etcd (Debian's etcd-server) on 127.0.0.1."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd not installed: run ./setup.sh test (the README's test command)")
    data = tmp_path_factory.mktemp("etcd")
    client, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
    log = open(data / "etcd.log", "wb")
    proc = subprocess.Popen(
        ["etcd", "--data-dir", str(data / "d"), "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=log, stderr=log)
    try:
        from ftvm.lab.lab import wait_etcd_healthy
        if not wait_etcd_healthy(url, 20):
            pytest.fail(f"etcd did not start; see {data}/etcd.log")
        yield url
    finally:
        proc.kill()
        proc.wait()
        log.close()


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (network namespaces, taps)")


@pytest.fixture(scope="session")
def guest_image():
    from ftvm.guest.build import build_guest
    return build_guest(log=lambda m: None)


# Labs live outside pytest's own temporary directory: pytest makes /tmp/pytest-of-<user>
# private (0700) again whenever any pytest session starts, and a lab's QEMUs run as an
# unprivileged user that must reach their files.
LAB_ROOT = Path("/var/tmp/ftvm-test-labs")


def new_lab_parent() -> Path:
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(LAB_ROOT, 0o711)
    d = Path(tempfile.mkdtemp(prefix="lab-", dir=LAB_ROOT))
    os.chmod(d, 0o711)
    return d


@pytest.fixture
def lab_parent() -> Iterator[Path]:
    """A directory for a lab a test brings up itself (removed afterwards)."""
    d = new_lab_parent()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _keep_logs(lab_dir: Path) -> None:
    """The lab's logs (agents, QEMU, storage daemons, lab clients) outlive it, for a failure's post-mortem."""
    keep = LAB_ROOT / "logs" / lab_dir.parent.name
    for log in [*lab_dir.glob("*/*.log"), *lab_dir.glob("*/state/vms/*/*.log"), *lab_dir.glob("*/state/vms/*/l3/*.log"),
                *lab_dir.glob("client-*.jsonl")]:
        dest = keep / log.relative_to(lab_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, dest)


def _lab(tmp_path_factory: pytest.TempPathFactory, guest_image, hosts: int,
         host_memory_mib: int = 2048, sites: int = 0, dr: bool = False, timing: object = None) -> Iterator[object]:
    from ftvm.lab import lab as labmod
    needs_root()
    if labmod.existing_namespaces():
        pytest.fail("a lab is already up on this machine: run `ftvm lab down` before the tests")
    parent = new_lab_parent()
    lab_dir = parent / "lab"
    try:
        state = labmod.up(hosts, lab_dir, probe_kernel=str(guest_image.kernel), host_memory_mib=host_memory_mib,
                          sites=sites, dr=dr, timing=timing)  # type: ignore[arg-type]
        yield state
    finally:
        _keep_logs(lab_dir)
        labmod.down(lab_dir)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_image) -> Iterator[object]:
    """A 2-host lab pool with real etcd, agents and QEMU; torn down even when tests fail."""
    yield from _lab(tmp_path_factory, guest_image, 2)


@pytest.fixture(scope="module")
def lab_big(tmp_path_factory: pytest.TempPathFactory, guest_image) -> Iterator[object]:
    """A 2-host lab pool whose hosts offer 8 GiB each (guests of 2 GiB at level 3)."""
    yield from _lab(tmp_path_factory, guest_image, 2, host_memory_mib=8192)


@pytest.fixture(scope="module")
def lab_sites(tmp_path_factory: pytest.TempPathFactory, guest_image) -> Iterator[object]:
    """A 3-host lab pool at two sites (h1, h2 at a; h3 at b), the quorum at a third."""
    yield from _lab(tmp_path_factory, guest_image, 3, host_memory_mib=3072, sites=2)


@pytest.fixture(scope="module")
def lab_dr(tmp_path_factory: pytest.TempPathFactory, guest_image) -> Iterator[object]:
    """A 2-host lab pool and a DR site (pool "dr", hosts h8 and h9, its own etcd) behind a WAN link;
    dr_confirm 15 s (a DR failover waits 25 s of silence, not 70)."""
    from ftvm.core.timing import Timing
    from ftvm.lab.lab import LAB_PARTNER_REPLACE_AFTER
    yield from _lab(tmp_path_factory, guest_image, 2, dr=True,
                    timing=Timing(partner_replace_after=LAB_PARTNER_REPLACE_AFTER, dr_confirm=15.0))


@pytest.fixture(scope="module")
def lab3(tmp_path_factory: pytest.TempPathFactory, guest_image) -> Iterator[object]:
    """A 3-host lab pool."""
    yield from _lab(tmp_path_factory, guest_image, 3)
