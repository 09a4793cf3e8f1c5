"""Lab scenarios shared by the demo, the benchmark and the acceptance tests.

`LabPool` wraps a running lab with the few operations scenarios need (define a
ledger VM, wait for states, run the client); `level1_failover` is the Level 1
story: client writing, the VM's host loses power, the VM restarts elsewhere,
and the numbers are measured from outside ftvm (client log, /proc, the disk).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..agent.copydir import copy_image
from ..core.replication import CopyState
from ..core.model import BootSpec, Desired, DiskSpec, Level, NicSpec, PoolSnapshot, RunState, VmSpec
from ..guest.build import GuestImage, make_ledger_disk
from ..guest.ledger_format import read_records
from ..store.etcd import EtcdUnavailable
from ..store.pool import Event, PoolStore
from . import lab as labmod
from . import topology as topo
from .client import Ack, read_log
from .observer import CopyObserver, find_copies

Progress = Callable[[str], None]


class ScenarioError(RuntimeError):
    pass


class LabPool:
    """Synchronous helpers over a lab's store (each call opens its own short connection)."""

    def __init__(self, state: labmod.LabState, dr: bool = False) -> None:
        """`dr`: the lab's DR pool (`lab up --dr`) instead of its main one."""
        self.state, self.dr = state, dr

    def _run(self, fn: Callable[[PoolStore], Any]) -> Any:
        async def go() -> Any:
            async with self.state.etcd_client(dr=self.dr) as c:
                return await fn(PoolStore(c, labmod.DR_POOL if self.dr else labmod.POOL))
        return asyncio.run(go())

    def run(self, fn: Callable[[PoolStore], Any]) -> Any:
        """Run `fn(store)` against the lab's pool (for ops calls in tests and benchmarks)."""
        return self._run(fn)

    def snapshot(self) -> PoolSnapshot:
        return self._run(lambda s: s.snapshot())

    def events(self, limit: int = 500) -> list[Event]:
        return self._run(lambda s: s.events(limit=limit))[0]

    def wait_events(self, what: str, match: Callable[[Event], bool], timeout: float = 10.0) -> list[Event]:
        """The events `match` selects, once there is at least one. An agent writes its events
        to the store at its next tick, after the state change they describe: a scenario that
        saw the state must still wait for the event."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if match(e)]
            if found:
                return found
            if time.monotonic() > deadline:
                raise ScenarioError(f"timed out after {timeout:g}s waiting for the event: {what}")
            time.sleep(0.1)

    def define_ledger_vm(self, name: str, index: int, level: Level, image: GuestImage,
                         host: str | None = None, memory_mib: int = 256, start: bool = True,
                         checkpoint_ms: int = 100, on_output: bool = True, vcpus: int = 1,
                         disk_size: int = 64 << 20, **spec_fields: Any) -> VmSpec:
        """`spec_fields`: further VmSpec fields (a health probe, restart limits)."""
        spec = self.ledger_spec(name, index, level, image, host, memory_mib, start, checkpoint_ms, on_output, vcpus,
                                disk_size, **spec_fields)
        if not self._run(lambda s: s.define_vm(spec)):
            raise ScenarioError(f"VM {name} already defined")
        return spec

    def ledger_spec(self, name: str, index: int, level: Level, image: GuestImage,
                    host: str | None = None, memory_mib: int = 256, start: bool = True,
                    checkpoint_ms: int = 100, on_output: bool = True, vcpus: int = 1,
                    disk_size: int = 64 << 20, **spec_fields: Any) -> VmSpec:
        """The spec of a VM running the demo guest's ledger (its disk made, on shared storage
        below level 2)."""
        if level.has_copies:  # each host keeps its own copy in its local storage
            disks: tuple[DiskSpec, ...] = (DiskSpec(size=disk_size),)
        else:
            disk = self.state.shared_dir / f"{name}.img"
            make_ledger_disk(disk, disk_size >> 20, sparse=disk_size > 1 << 30)
            disks = (DiskSpec(str(disk)),)
        spec = VmSpec(name=name, level=level, memory_mib=memory_mib, vcpus=vcpus, disks=disks,
                      nics=(NicSpec(f"52:54:00:77:00:{index:02x}", topo.vm_addr(index)),),
                      boot=BootSpec(str(image.kernel), str(image.initrd), image.append),
                      desired=Desired.RUNNING if start else Desired.STOPPED, preferred_host=host,
                      checkpoint_ms=checkpoint_ms, checkpoint_on_output=on_output, **spec_fields)
        return spec

    def wait_running(self, name: str, timeout: float, not_on: str | None = None) -> str:
        """Wait until the VM runs (on a host other than `not_on`); returns the host."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.snapshot().vms.get(name)
            if (view and view.owner and view.status and view.status.state is RunState.RUNNING
                    and view.owner.host != not_on):
                return view.owner.host
            time.sleep(0.1)
        raise ScenarioError(f"VM {name} not running within {timeout:g}s")

    def set_checkpointing(self, name: str, interval_ms: int, on_output: bool) -> None:
        """A level 3 VM's checkpoint interval and trigger (the agent follows within seconds)."""
        async def change(store: PoolStore) -> bool:
            from dataclasses import replace
            got = await store.spec(name)
            if got is None:
                return False
            spec, rev = got
            return await store.update_spec(replace(spec, checkpoint_ms=interval_ms,
                                                   checkpoint_on_output=on_output), rev)
        if not self._run(change):
            raise ScenarioError(f"could not change the checkpointing of {name}")

    def stop_and_remove(self, name: str, timeout: float = 30) -> None:
        async def stop(store: PoolStore) -> None:
            from dataclasses import replace
            got = await store.spec(name)
            if got is None:
                return
            spec, rev = got
            await store.update_spec(replace(spec, desired=Desired.STOPPED, stop_force=True), rev)
            deadline = time.monotonic() + timeout
            while (await store.snapshot()).vms[name].owner is not None:
                if time.monotonic() > deadline:
                    view = (await store.snapshot()).vms[name]
                    host = view.owner.host if view.owner else "?"
                    log = self.state.host_dir(host) / "agent.log"
                    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
                    raise ScenarioError(f"VM {name} did not stop within {timeout:g}s (status {view.status}); "
                                        f"{host}'s agent log ends:\n" + "\n".join(tail))
                await asyncio.sleep(0.1)
            got = await store.spec(name)
            assert got is not None
            await store.remove_vm(name, got[1])
        self._run(stop)

    def wait_for(self, what: str, check: Callable[[PoolSnapshot], bool], timeout: float) -> PoolSnapshot:
        deadline = time.monotonic() + timeout
        unavailable = ""
        while True:
            try:
                snap: PoolSnapshot | None = self.snapshot()
            except EtcdUnavailable as e:  # a loaded host: a later poll may get through (the deadline holds)
                snap, unavailable = None, f" (etcd last unavailable: {e})"
            if snap is not None and check(snap):
                return snap
            if time.monotonic() > deadline:
                raise ScenarioError(f"timed out after {timeout:g}s waiting for {what}{unavailable}")
            time.sleep(0.1)

    def agent_ticks(self, host: str) -> int:
        """How many reconcile ticks `host`'s agent has run (its /metrics)."""
        import re
        import urllib.request
        req = urllib.request.Request(self.state.api_url(host) + "/metrics", headers={
            "Authorization": f"Bearer {self.state.api_token_file.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=5, context=self.state.https()) as r:
            text = r.read().decode()
        m = re.search(r'^ftvm_ticks_total\{host="%s"\} (\d+)' % re.escape(host), text, re.M)
        if m is None:
            raise ScenarioError(f"{host}'s metrics have no tick counter")
        return int(m.group(1))

    def wait_ticks(self, hosts: list[str], n: int = 4, timeout: float = 120) -> None:
        """Until each agent in `hosts` has run `n` more reconcile ticks: whatever they were
        going to decide from the state as it is now, they have decided (instead of a sleep,
        which a loaded machine can outlast)."""
        start = {h: self.agent_ticks(h) for h in hosts}
        deadline = time.monotonic() + timeout
        while any(self.agent_ticks(h) < start[h] + n for h in hosts):
            if time.monotonic() > deadline:
                raise ScenarioError(f"agents {hosts} did not run {n} ticks in {timeout:g}s")
            time.sleep(0.1)

    def copy_path(self, vm: str, host: str) -> tuple[Path, str]:
        """(image, format) of `host`'s level 2 or 3 copy of the VM's first disk."""
        view = self.snapshot().vms.get(vm)
        level3 = view is not None and view.spec.level is Level.SYSTEM
        fmt = "raw" if level3 or topo.host_index(host) % 2 else "qcow2"
        return Path(copy_image(self.state.host_dir(host) / "local", vm, 0, fmt).path), fmt

    def copy_as_raw(self, vm: str, host: str, dest: Path) -> Path:
        """A raw snapshot of a host's copy (readable while in use), for the ledger reader."""
        src, fmt = self.copy_path(vm, host)
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(src), str(dest)],
                       check=True, capture_output=True)
        return dest

    def debug_qmp(self, vm: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One QMP command on the lab's debug socket of the QEMU running `vm` (the agent's
        own connection is untouched)."""
        from qemu.qmp import QMPClient
        view = self.snapshot().vms[vm]
        assert view.owner is not None
        sock = self.state.host_dir(view.owner.host) / "state" / "vms" / vm / "qmp-debug.sock"

        async def run() -> Any:
            q = QMPClient("lab")
            await q.connect(str(sock))
            try:
                return await q.execute(cmd, args)
            finally:
                await q.disconnect()
        return asyncio.run(run())

    def disk_stats(self, vm: str) -> dict[str, int]:
        """QEMU's counters for the VM's first disk as the guest sees it (operations and
        total nanoseconds of writes and flushes, from submission to completion)."""
        stats = self.debug_qmp(vm, "query-blockstats", {"query-nodes": False})
        return {k: int(v) for k, v in stats[0]["stats"].items() if isinstance(v, int) and not isinstance(v, bool)}

    def copies_identical(self, vm: str, a: str, b: str) -> str | None:
        """Quiesce the guest (`stop` on the lab's debug QMP socket of the host running it),
        compare host `a`'s and `b`'s copies block by block, resume. None if identical, else
        what qemu-img said."""
        self.debug_qmp(vm, "stop")
        try:
            (pa, fa), (pb, fb) = self.copy_path(vm, a), self.copy_path(vm, b)
            r = subprocess.run(["qemu-img", "compare", "-U", "-f", fa, "-F", fb, str(pa), str(pb)],
                               capture_output=True, text=True)
            return None if r.returncode == 0 else (r.stdout + r.stderr).strip()
        finally:
            self.debug_qmp(vm, "cont")

    def ask(self, ip: str, line: str, timeout: float = 60) -> str:
        """One request to the ledger from the client namespace; returns the reply line."""
        proc = subprocess.run(
            ["ip", "netns", "exec", topo.CLIENT_NS, sys.executable, "-c",
             "import socket,sys; s=socket.create_connection((sys.argv[1],7000),timeout=5);"
             f"s.settimeout({timeout}); s.sendall(sys.argv[2].encode()+b'\\n');"
             "print(s.makefile().readline().strip())", ip, line],
            capture_output=True, text=True, timeout=timeout + 10)
        if proc.returncode != 0:
            raise ScenarioError(f"ledger at {ip} did not answer {line!r}: {proc.stderr.strip()[-200:]}")
        return proc.stdout.strip()

    def latencies(self, ip: str, count: int, idle_s: float = 0.0) -> list[float]:
        """Round-trip seconds of `count` ledger writes, one after another, from the client namespace
        (`idle_s`: a pause before each, so the guest and the host go idle first)."""
        code = ("import json,socket,sys,time; s=socket.create_connection((sys.argv[1],7000),timeout=30);"
                "f=s.makefile('rw'); out=[]\n"
                "for i in range(int(sys.argv[2])):\n"
                " time.sleep(float(sys.argv[3]))\n"
                " t=time.perf_counter(); f.write('W lat-%d\\n' % i); f.flush(); r=f.readline()\n"
                " assert r.startswith('OK'), r\n"
                " out.append(time.perf_counter()-t)\n"
                "print(json.dumps(out))")
        proc = subprocess.run(["ip", "netns", "exec", topo.CLIENT_NS, sys.executable, "-c", code, ip, str(count),
                               str(idle_s)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise ScenarioError(f"latency run failed: {proc.stderr.strip()[-300:]}")
        return [float(x) for x in json.loads(proc.stdout)]

    def bulk_write(self, ip: str, mib: int, chunk_kib: int = 64, buffered: bool = False) -> float:
        """Have the guest write `mib` MiB in O_DSYNC writes of `chunk_kib` (or, `buffered`, through
        its page cache with one fdatasync at the end); returns the guest's seconds."""
        kind = "B" if buffered else "F"
        reply = self.ask(ip, f"{kind} {mib * 1024} {chunk_kib}", timeout=600).split()
        if reply[:2] != ["OK", kind]:
            raise ScenarioError(f"bulk write failed: {' '.join(reply)}")
        return int(reply[3]) / 1e6

    def parallel_bulk_write(self, ip: str, writers: int, mib_each: int, chunk_kib: int = 1024) -> float:
        """`writers` bulk writes at once (queue depth `writers`); returns MiB/s over the wall time."""
        code = ("import socket,sys,time; n=int(sys.argv[2]); socks=[socket.create_connection((sys.argv[1],7000),"
                "timeout=600) for _ in range(n)]; t=time.perf_counter()\n"
                "for s in socks: s.sendall(sys.argv[3].encode()+b'\\n')\n"
                "r=[s.makefile().readline() for s in socks]; w=time.perf_counter()-t\n"
                "assert all(x.startswith('OK F') for x in r), r\n"
                "print(w)")
        proc = subprocess.run(["ip", "netns", "exec", topo.CLIENT_NS, sys.executable, "-c", code, ip, str(writers),
                               f"F {mib_each * 1024} {chunk_kib}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ScenarioError(f"parallel bulk write failed: {proc.stderr.strip()[-300:]}")
        return writers * mib_each / float(proc.stdout)

    def wait_answering(self, ip: str, timeout: float) -> float:
        """Wait until the ledger answers a ping from the client namespace; returns when."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ip", "netns", "exec", topo.CLIENT_NS, sys.executable, "-c",
                 "import socket,sys; s=socket.create_connection((sys.argv[1],7000),timeout=1);"
                 "s.settimeout(2); s.sendall(b'P\\n'); sys.exit(0 if s.recv(16).startswith(b'PONG') else 1)",
                 ip], capture_output=True)
            if probe.returncode == 0:
                return time.time()
            time.sleep(0.2)
        raise ScenarioError(f"ledger at {ip} did not answer within {timeout:g}s")


class LabClient:
    """The ledger client running in the client namespace, logging to a file."""

    def __init__(self, state: labmod.LabState, ip: str, name: str, interval: float = 0.02,
                 reply_timeout: float = 2.0) -> None:
        self.log = Path(state.dir) / f"client-{name}.jsonl"
        self.log.unlink(missing_ok=True)
        self.log.touch()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.CLIENT_NS, sys.executable, "-m", "ftvm.lab.client",
             "--target", f"{ip}:7000", "--out", str(self.log), "--interval", str(interval),
             "--prefix", name, "--reply-timeout", str(reply_timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def acks(self) -> list[Ack]:
        return read_log(self.log)[0]

    def other_events(self) -> list[dict[str, object]]:
        """Connects and errors, in order."""
        return read_log(self.log)[1]

    def wait_acks(self, count: int, timeout: float, after: float = 0.0) -> list[Ack]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acks = [a for a in self.acks() if a.t > after]
            if len(acks) >= count:
                return acks
            time.sleep(0.05)
        raise ScenarioError(f"client got fewer than {count} acknowledgements within {timeout:g}s")

    def stop(self) -> list[Ack]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.acks()


def copy_is(vm: str, host: str, state: CopyState) -> Callable[[PoolSnapshot], bool]:
    """A `LabPool.wait_for` condition: `host`'s level 2 copy of `vm` is in `state`."""
    return lambda snap: snap.vms[vm].copy_state(host) is state


def replica_current(vm: str) -> Callable[[PoolSnapshot], bool]:
    """A `LabPool.wait_for` condition: the level 2 VM's partner copy (wherever placement put
    it) is current."""
    def check(snap: PoolSnapshot) -> bool:
        view = snap.vms.get(vm)
        if view is None or view.owner is None or view.copies is None:
            return False
        partner = view.copies.partner_of(view.owner.host)
        return partner is not None and view.copy_state(partner) is CopyState.CURRENT
    return check


def check_acked_on_disk(image: Path, acks: list[Ack], offset: int = 0) -> tuple[int, list[Ack]]:
    """(records on disk, acknowledged records missing or different on disk); `offset`: where
    the ledger starts in the image."""
    records = {r.seq: r for r in read_records(image, offset)}
    lost = [a for a in acks if records.get(a.seq) is None or records[a.seq].payload != a.payload.encode()]
    return len(records), lost


@dataclass
class FailoverResult:
    vm: str
    failed_host: str
    new_host: str
    lease_ttl_s: float
    outage_s: float         # last ack before the failure -> first ack after (seen by the client)
    detection_s: float      # power loss -> a survivor claimed the VM (its lease expired)
    restart_s: float        # claim -> first ack from the restarted VM
    acknowledged: int       # records the client saw acknowledged (all checked on disk)
    lost: int               # acknowledged records missing from the disk (must be 0)
    max_copies: int         # most QEMU copies of the VM seen at once, from /proc (must be 1)
    copy_samples: int
    events: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def level1_failover(pool: LabPool, image: GuestImage, name: str = "web", index: int = 0,
                    progress: Progress = lambda m: None, client_interval: float = 0.02) -> FailoverResult:
    """Define and start a Level 1 ledger VM on the first live host, then `host_failure` it."""
    live = [h for h in pool.state.hosts if h not in pool.state.failed]
    progress(f"defining Level 1 VM {name} on {live[0]} (disk on shared storage)")
    spec = pool.define_ledger_vm(name, index, Level.RESTART, image, host=live[0])
    return host_failure(pool, spec, progress, client_interval)


def host_failure(pool: LabPool, spec: VmSpec, progress: Progress = lambda m: None,
                 client_interval: float = 0.02) -> FailoverResult:
    """With the client writing to the VM, cut the power of its host; measure until the client
    gets answers again from another host. Leaves the failed host down (the caller restores it)."""
    state, name = pool.state, spec.name
    ip = spec.nics[0].ip.split("/")[0] if spec.nics[0].ip else ""
    host = pool.wait_running(name, 60)
    progress(f"VM {name} running on {host}; waiting for the ledger to answer")
    pool.wait_answering(ip, 60)
    with CopyObserver(name) as observer:
        client = LabClient(state, ip, name, client_interval)
        try:
            client.wait_acks(100, 30)
            progress(f"client writing to {ip}; now {host} loses power")
            failed_at = labmod.fail_host(state, host)
            new_host = pool.wait_running(name, 60, not_on=host)
            progress(f"VM {name} restarted on {new_host}; waiting for the client's next answer")
            after = client.wait_acks(100, 60, after=failed_at)
        finally:
            acks = client.stop()
    before = [a for a in acks if a.t <= failed_at]
    if not before or not after:
        raise ScenarioError("client log lacks acknowledgements around the failure")
    first_after = min(a.t for a in acks if a.t > failed_at)
    events = pool.events()
    claims = [e for e in events if e.vm == name and e.kind == "claim" and e.time > failed_at]
    if not claims:
        raise ScenarioError("no claim event after the failure")
    claim_at = claims[0].time
    if spec.level is Level.COMPONENT:  # the copy the VM now runs from
        image = pool.copy_as_raw(name, new_host, Path(state.dir) / f"{name}-check.raw")
    else:
        image = Path(spec.disks[0].path)
    on_disk, lost = check_acked_on_disk(image, acks)
    progress(f"checked {len(acks)} acknowledged records against {on_disk} on disk: {len(lost)} lost")
    return FailoverResult(
        vm=name, failed_host=host, new_host=new_host, lease_ttl_s=state.timing["lease_ttl"],
        outage_s=round(first_after - max(a.t for a in before), 3),
        detection_s=round(claim_at - failed_at, 3), restart_s=round(first_after - claim_at, 3),
        acknowledged=len(acks), lost=len(lost), max_copies=observer.max_copies,
        copy_samples=observer.samples,
        events=[str(e) for e in events if e.vm == name and e.time > failed_at - 1])


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise ScenarioError("the lab needs root (network namespaces, taps)")


@dataclass
class Level2Result:
    vm: str
    disk_failure_stall_s: float  # longest gap between acknowledgements around the disk failure
    failed_host: str
    new_host: str
    outage_s: float              # client-visible outage around the power loss
    detection_s: float
    restart_s: float
    acknowledged: int
    lost: int
    resync_bytes: int            # what the old primary's (full) resync copied when it came back
    resync_s: float
    max_copies: int
    copy_samples: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _gap_around(acks: list[Ack], t: float) -> float:
    before = [a.t for a in acks if a.t <= t]
    after = [a.t for a in acks if a.t > t]
    return round(min(after) - max(before), 3) if before and after else float("nan")


def level2_story(pool: LabPool, image: GuestImage, name: str = "db", index: int = 1,
                 progress: Progress = lambda m: None) -> Level2Result:
    """The Level 2 demo: mirrored disks; the primary's disk fails (masked), then the
    primary loses power (restart on the partner from its copy, nothing lost), then the
    old primary returns and is resynced as the new replica."""
    from .faults import fail_disk

    state = pool.state
    progress(f"defining Level 2 VM {name}: a disk copy on h1 (raw) and on h2 (qcow2), mirrored")
    pool.define_ledger_vm(name, index, Level.COMPONENT, image, host="h1")
    ip = topo.vm_addr(index).split("/")[0]
    host = pool.wait_running(name, 60)
    pool.wait_answering(ip, 60)

    partner = "h2" if host == "h1" else "h1"
    pool.wait_for("the replica in sync", copy_is(name, partner, CopyState.CURRENT), 60)
    progress(f"VM {name} on {host}, every write mirrored to {partner}: Protected")
    with CopyObserver(name) as observer:
        client = LabClient(state, ip, name)
        try:
            client.wait_acks(100, 30)
            progress(f"the local disk of {host} fails (every I/O returns EIO)")
            disk_failed_at = time.time()
            fail_disk(state, name, host)
            pool.wait_for("the failed copy recorded", copy_is(name, host, CopyState.FAILED), 30)
            client.wait_acks(100, 30, after=disk_failed_at)
            progress(f"masked: the VM carries on using the copy on {partner}; now {host} loses power")
            failed_at = labmod.fail_host(state, host)
            new_host = pool.wait_running(name, 60, not_on=host)
            progress(f"VM restarted on {new_host} from its copy; waiting for the client's next answer")
            client.wait_acks(100, 60, after=failed_at)
            progress(f"{host} powers on and becomes the replica: full resync of its copy")
            labmod.restore_host(state, host)
            pool.wait_for("the old primary resynced", copy_is(name, host, CopyState.CURRENT), 120)
            client.wait_acks(20, 30, after=time.time())
        finally:
            acks = client.stop()
    syncs = pool.wait_events("resync done", lambda e: e.vm == name and e.kind == "in-sync" and e.time > failed_at)
    claims = [e for e in pool.events() if e.vm == name and e.kind == "claim" and e.time > failed_at]
    if not claims:
        raise ScenarioError("missing claim event")
    copied = int(syncs[-1].message.split("resync copied ")[1].split()[0])
    seconds = float(syncs[-1].message.rsplit(" in ", 1)[1].split("s")[0])
    raw = pool.copy_as_raw(name, new_host, Path(state.dir) / f"{name}-check.raw")
    on_disk, lost = check_acked_on_disk(raw, acks)
    progress(f"checked {len(acks)} acknowledged records against {on_disk} on disk: {len(lost)} lost")
    first_after = min(a.t for a in acks if a.t > failed_at)
    return Level2Result(
        vm=name, disk_failure_stall_s=_gap_around(acks, disk_failed_at), failed_host=host, new_host=new_host,
        outage_s=_gap_around(acks, failed_at), detection_s=round(claims[0].time - failed_at, 3),
        restart_s=round(first_after - claims[0].time, 3), acknowledged=len(acks), lost=len(lost),
        resync_bytes=copied, resync_s=seconds, max_copies=observer.max_copies, copy_samples=observer.samples)


# --- Level 3 -----------------------------------------------------------------------------

PANIC_MARKERS = ("Kernel panic", "Oops", "BUG:", "general protection fault", "Call Trace")


def l3_protected(vm: str) -> Callable[[PoolSnapshot], bool]:
    """A `LabPool.wait_for` condition: the level 3 VM is checkpointed to a current replica."""
    def check(snap: PoolSnapshot) -> bool:
        view = snap.vms.get(vm)
        if view is None or view.owner is None or view.checkpoints is None:
            return False
        partner = view.checkpoints.partner
        current_partner = view.copies.partner_of(view.owner.host) if view.copies else None
        return (view.checkpoints.state == "protected" and partner == current_partner
                and view.copy_state(partner) is CopyState.CURRENT)
    return check


def serial_problems(state: labmod.LabState, host: str, vm: str) -> list[str]:
    """Lines of the guest's serial console on `host` that show a kernel oops or panic."""
    path = state.host_dir(host) / "state" / "vms" / vm / "serial.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if any(m in line for m in PANIC_MARKERS)]


@dataclass
class Level3Result:
    vm: str
    failed_host: str
    new_host: str
    failed_at: float             # wall-clock time of the power loss
    pause_s: float               # the client's longest wait for a reply around the power loss
    reply_after_loss_s: float    # power loss -> the client's next reply
    takeover_s: float            # power loss -> the partner ended the old ownership
    connections: int             # TCP connections the client opened (1: never reset)
    connection_kept: bool
    client_errors: int
    acknowledged: int
    lost: int                    # acknowledged records missing from the new primary's disk
    seq_gaps: int                # breaks in the acknowledged sequence (must be 0)
    seq_repeats: int
    guest_problems: list[str]    # oops/panic lines on the new host's serial console
    max_copies: int
    copy_samples: int
    overlaps: list[str] = field(default_factory=list)  # when more than one copy was seen, and where
    resumed_in_warm_qemu: bool = False  # the partner resumed in a QEMU started ahead (agent/warm.py)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sequence_breaks(acks: list[Ack]) -> tuple[int, int]:
    """(gaps, repeats) in the ledger sequence numbers the client saw acknowledged."""
    seqs = [a.seq for a in acks]
    steps = [b - a for a, b in zip(seqs, seqs[1:], strict=False)]
    return sum(1 for d in steps if d > 1), sum(1 for d in steps if d < 1)


def level3_failover(pool: LabPool, spec: VmSpec, progress: Progress = lambda m: None,
                    healthy_s: float = 10.0, client_interval: float = 0.02, warm: bool = True) -> Level3Result:
    """With one client connection writing, cut the power of the VM's host: the partner
    carries on from the last checkpoint. Checks the connection, the sequence, the disk and
    the guest's console for `healthy_s` after. Leaves the failed host down. `warm`: first
    wait until the partner has its QEMU started ahead (seen in /proc: a second QEMU of the
    VM whose guest has not run)."""
    state, name = pool.state, spec.name
    ip = spec.nics[0].ip.split("/")[0] if spec.nics[0].ip else ""
    host = pool.wait_running(name, 60)
    pool.wait_answering(ip, 60)
    pool.wait_for("level 3 protection", l3_protected(name), 120)
    if warm:
        pool.wait_for("the partner's QEMU started ahead",
                      lambda s: len(find_copies(name, waiting_too=True)) > len(find_copies(name)), 60)
    progress(f"VM {name} on {host}, checkpointed to its partner: Protected")
    with CopyObserver(name) as observer:
        client = LabClient(state, ip, name, client_interval, reply_timeout=120)
        try:
            client.wait_acks(50, 30)
            progress(f"one client connection writing to {ip}; now {host} loses power")
            failed_at = labmod.fail_host(state, host)
            client.wait_acks(1, 60, after=failed_at)
            new_host = pool.wait_running(name, 30, not_on=host)
            progress(f"the VM carries on on {new_host}; watching the guest for {healthy_s:g}s")
            time.sleep(healthy_s)
            client.wait_acks(20, 30, after=time.time() - healthy_s)
        finally:
            acks = client.stop()
    other = client.other_events()
    connects = sum(1 for e in other if e.get("kind") == "connect")
    errors = [e for e in other if e.get("kind") == "error"]
    gaps, repeats = sequence_breaks(acks)
    first_after = min(a.t for a in acks if a.t > failed_at)
    takeovers = [e for e in pool.events() if e.vm == name and e.kind == "takeover" and e.time > failed_at]
    raw, _ = pool.copy_path(name, new_host)
    on_disk, lost = check_acked_on_disk(raw, acks)
    progress(f"{len(acks)} acknowledged records, {len(lost)} missing on {new_host}'s disk ({on_disk} there); "
             f"{connects} connection(s), {gaps} gaps, {repeats} repeats")
    return Level3Result(
        vm=name, failed_host=host, new_host=new_host, failed_at=failed_at, pause_s=_gap_around(acks, failed_at),
        reply_after_loss_s=round(first_after - failed_at, 3),
        takeover_s=round(takeovers[0].time - failed_at, 3) if takeovers else float("nan"),
        connections=connects, connection_kept=connects == 1 and not errors, client_errors=len(errors),
        acknowledged=len(acks), lost=len(lost), seq_gaps=gaps, seq_repeats=repeats,
        guest_problems=serial_problems(state, new_host, name), max_copies=observer.max_copies,
        copy_samples=observer.samples,
        overlaps=[f"{t - failed_at:+.3f}s {copies}" for t, copies in observer.overlaps[:5]],
        resumed_in_warm_qemu=any(e.kind == "start" and "started ahead" in e.message for e in pool.events()
                                 if e.vm == name and e.time > failed_at))


@dataclass
class Level3Story:
    level3: Level3Result
    reprotect_s: float           # the old primary back -> Protected again (pre-copy while running)
    level1_vm: str               # a Level 1 VM on the same host, for comparison
    level1_outage_s: float
    level1_connections: int      # the Level 1 client had to reconnect (its connection died)

    def to_json(self) -> dict[str, Any]:
        return {**self.level3.to_json(), "reprotect_s": self.reprotect_s, "level1_vm": self.level1_vm,
                "level1_outage_s": self.level1_outage_s, "level1_connections": self.level1_connections}


def level3_story(pool: LabPool, image: GuestImage, name: str = "trade", index: int = 3,
                 progress: Progress = lambda m: None) -> Level3Story:
    """The Level 3 demo, beside a Level 1 VM on the same host: the host loses power; the
    Level 3 VM carries on on the partner with its client's connection open, the Level 1 VM
    reboots there; the old primary returns and Level 3 protection comes back."""
    progress(f"defining Level 3 VM {name} (checkpointed every 100 ms from h1 to h2) and, beside it, "
             "Level 1 VM web (restart on failure)")
    spec = pool.define_ledger_vm(name, index, Level.SYSTEM, image, host="h1")
    web = pool.define_ledger_vm("web", 0, Level.RESTART, image, host="h1")
    web_ip = (web.nics[0].ip or "").split("/")[0]
    pool.wait_running("web", 60)
    pool.wait_answering(web_ip, 60)
    web_client = LabClient(pool.state, web_ip, "web", 0.02)
    try:
        result = level3_failover(pool, spec, progress)
        web_acks = web_client.wait_acks(1, 60, after=result.failed_at)
    finally:
        web_acks = web_client.stop()
    web_connects = sum(1 for e in web_client.other_events() if e.get("kind") == "connect")
    progress(f"{result.failed_host} powers on; the VM is protected again by a full copy made while it runs")
    t0 = time.monotonic()
    labmod.restore_host(pool.state, result.failed_host)
    pool.wait_for("level 3 protection again", l3_protected(name), 120)
    return Level3Story(result, round(time.monotonic() - t0, 1), "web",
                       _gap_around(web_acks, result.failed_at), web_connects)


def closed_loop(ip: str, connections: int, seconds: float) -> dict[str, float]:
    """`connections` clients, each writing a ledger record and waiting for the reply, again
    and again, for `seconds` (from the client namespace). Requests/s and latency percentiles."""
    code = (
        "import json,socket,sys,threading,time\n"
        "ip,n,secs=sys.argv[1],int(sys.argv[2]),float(sys.argv[3]); lat=[]; lock=threading.Lock()\n"
        "socks=[socket.create_connection((ip,7000),timeout=60) for _ in range(n)]\n"
        "end=time.perf_counter()+secs\n"
        "def run(i,s):\n"
        " f=s.makefile('rw'); k=0\n"
        " while time.perf_counter()<end:\n"
        "  t=time.perf_counter(); f.write('W cl-%d-%d\\n'%(i,k)); f.flush(); r=f.readline(); k+=1\n"
        "  assert r.startswith('OK'), r\n"
        "  with lock: lat.append(time.perf_counter()-t)\n"
        "ts=[threading.Thread(target=run,args=(i,s)) for i,s in enumerate(socks)]\n"
        "t0=time.perf_counter()\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(json.dumps({'n':len(lat),'wall':time.perf_counter()-t0,'lat':sorted(lat)}))")
    proc = subprocess.run(["ip", "netns", "exec", topo.CLIENT_NS, sys.executable, "-c", code, ip,
                           str(connections), str(seconds)], capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise ScenarioError(f"closed-loop run failed: {proc.stderr.strip()[-300:]}")
    d = json.loads(proc.stdout)
    lat = d["lat"] or [0.0]
    return {"connections": connections, "requests_per_s": round(d["n"] / d["wall"], 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1), "p99_ms": round(lat[min(len(lat) - 1,
                                                                                 int(0.99 * len(lat)))] * 1000, 1)}
