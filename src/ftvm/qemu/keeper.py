"""The keeper: the parent of one QEMU, so a guest outlives its agent but never its fence.

An agent restart (an upgrade, a crash, a bug) must not end the guests it runs, yet a
guest must never run past its host's lease (agent/fence.py). So QEMU is not the agent's
child: it is the child of a keeper, a small process that

  * starts QEMU as the agent asked (its user and groups, the tap descriptors the agent
    opened, its environment), with PR_SET_PDEATHSIG: killing the keeper kills the guest;
  * kills QEMU when the host's fence deadline passes. The agent rewrites that deadline
    (`deadline_file`: the host lease and CLOCK_MONOTONIC seconds) after every lease
    renewal; a deadline that cannot be read, or that names another lease than the one
    the guest was started under, counts as passed. Without an agent renewing the lease, every guest is
    therefore dead `self_fence_margin` before etcd can expire the lease, exactly as when
    the agent's own fence guard kills it; a new agent that takes the lease over in time
    (agent/lease.py) moves the deadline on, and the guests never notice;
  * kills QEMU when the agent that started it ends, unless the agent said it may be
    adopted by the next one (`adoptable`);
  * says how QEMU ended (`exit.json`) and exits.

It detaches (double fork), so a keeper a new agent adopts and one it started itself are
watched alike: through pidfds and the files in the VM's run directory. It imports
nothing heavy and does nothing else: it has little that can fail.

This module is also the agent's side: `spawn` starts a keeper, `Kept` watches one, and
`find` lists the keepers still running when an agent starts (agent/adoption.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio  # (the agent's side only: the keeper starts in ~30 ms without it, not ~90)

KEEPER_FILE = "keeper.json"  # written by the keeper once QEMU runs: both PIDs and start times
EXIT_FILE = "exit.json"      # written by the keeper as it ends: QEMU's exit code, fenced or not
AGENT_GONE = "ftvm keeper: the agent ended, pid"  # (in QEMU's log: the test waits on it)
META_FILE = "vm.json"        # written by the agent: what this QEMU runs (agent/adoption.py)
SPAWN_TIMEOUT_S = 10.0

_PR_SET_PDEATHSIG = 1


def process_start(pid: int) -> int:
    """The process's start time (clock ticks since boot): with its PID, names it for good."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def read_deadline(deadline_file: Path) -> tuple[int, float] | None:
    """(lease, monotonic deadline) as the file says, or None."""
    try:
        named, deadline = deadline_file.read_text().split()
        return int(named, 16), float(deadline)
    except (OSError, ValueError):
        return None


def may_run(deadline_file: Path, lease: int) -> bool:
    """Whether a guest started under host lease `lease` may still run: the file names that
    lease and a deadline not yet passed. A file that cannot be read, or names another
    lease (the host joined again with a new one), says no."""
    found = read_deadline(deadline_file)
    return found is not None and found[0] == lease and time.monotonic() < found[1]


def write_deadline(deadline_file: Path, lease: int, deadline: float) -> None:
    """The agent's side: guests started under `lease` may run until `deadline` (monotonic)."""
    tmp = deadline_file.with_name(deadline_file.name + ".tmp")
    tmp.write_text(f"{lease:x} {deadline:.6f}\n")
    os.replace(tmp, deadline_file)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# --- the keeper process ---------------------------------------------------------------

def _qemu_child(libc: Any, keeper: int, nice0: bool) -> None:  # in QEMU's process, between fork and exec
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != keeper:
        os._exit(1)  # the keeper died before the prctl: never run unkept
    if nice0:
        libc.setpriority(0, 0, 0)  # QEMU at nice 0, below the agent and its keeper


def _keep(args: argparse.Namespace) -> int:
    run_dir, deadline_file = Path(args.dir), Path(args.deadline)
    fds = [int(f) for f in args.fds.split(",") if f]
    try:  # (the agent waits for our answer: it is alive now, so this PID is it)
        agent = os.pidfd_open(args.agent) if args.agent else -1
    except OSError:
        agent = -1
    if args.agent and agent < 0:
        print("error: the agent that asked for QEMU is gone", flush=True)
        return 3
    if not may_run(deadline_file, args.lease):
        print("error: the host's fence deadline has passed: QEMU not started", flush=True)
        return 3
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    how: dict[str, Any] = {"umask": 0o077}
    if args.uid is not None:
        how.update(user=args.uid, group=args.gid, extra_groups=[int(g) for g in args.groups.split(",") if g])
    libc, me = ctypes.CDLL(None, use_errno=True), os.getpid()  # (loaded before the fork: no dlopen after it)
    with open(args.log, "ab") as log:
        try:
            qemu = subprocess.Popen(args.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=fds,
                                    env=env, preexec_fn=lambda: _qemu_child(libc, me, args.nice0), **how)
        except OSError as e:
            print(f"error: cannot start QEMU: {e}", flush=True)
            return 4
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(qemu.pid)
    _write_json(run_dir / KEEPER_FILE, {"keeper": os.getpid(), "keeper_start": process_start(os.getpid()),
                                        "qemu": qemu.pid, "qemu_start": process_start(qemu.pid)})
    print(f"qemu {qemu.pid}", flush=True)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # the agent's pipe closes: it reads no more from us
        os.dup2(null, fd)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log_fd, 2)  # (whatever goes wrong here is told beside QEMU's own messages)
    fenced = orphaned = False
    while True:
        ready = select.select([pidfd] + ([agent] if agent >= 0 else []), [], [], args.check)[0]
        if pidfd in ready:
            break
        if agent in ready:  # the agent ended: only a guest the next agent can adopt lives on
            os.close(agent)
            agent = -1
            if not adoptable(run_dir):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                orphaned = True
            else:
                print(f"{AGENT_GONE} {args.agent}: QEMU left running for the next agent", file=sys.stderr, flush=True)
        if not fenced and not may_run(deadline_file, args.lease):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            fenced = True
    code = qemu.wait()
    _write_json(run_dir / EXIT_FILE, {"code": code, "fenced": fenced, "orphaned": orphaned})
    return 0


def adoptable(run_dir: Path) -> bool:
    """Whether the agent said this QEMU may outlive it (`META_FILE`, agent/adoption.py): a
    running VM whose NICs are its own taps. A level 3 QEMU's NICs go through the agent's
    relays, a warm standby or a migration's target is the agent's own business: they end
    with it, as before keepers, so no copy of a guest runs unseen after its agent."""
    try:
        return json.loads((run_dir / META_FILE).read_text()).get("relayed_nics") is False
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftvm-keeper")
    p.add_argument("--dir", required=True)
    p.add_argument("--deadline", required=True)
    p.add_argument("--lease", type=lambda v: int(v, 16), required=True)
    p.add_argument("--check", type=float, default=0.05)
    p.add_argument("--log", required=True)
    p.add_argument("--fds", default="")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--groups", default="")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--nice0", action="store_true")
    p.add_argument("--agent", type=int, default=0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only SIGKILL ends a keeper (and its guest)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.fork() > 0:
        os._exit(0)  # detached: the agent is not our parent (see the module's doc)
    os.setsid()
    return _keep(args)


# --- the agent's side ------------------------------------------------------------------

class KeeperError(RuntimeError):
    pass


@dataclass
class Kept:
    """A QEMU under its keeper, as the agent watches it: `pid` and a pidfd (`kill` goes
    there, never to a recycled PID); `wait` until the keeper ends, then its exit code."""

    pid: int
    qemu_start: int
    keeper_pid: int
    keeper_pidfd: int
    run_dir: Path

    def open_pidfd(self) -> int:
        """A pidfd on the QEMU (OSError if it is gone, or its PID now names another process)."""
        fd = os.pidfd_open(self.pid)
        try:
            if process_start(self.pid) != self.qemu_start:
                raise ProcessLookupError(f"PID {self.pid} is no longer this QEMU")
        except OSError:
            os.close(fd)
            raise
        return fd

    _ended: asyncio.Future[None] | None = None  # set once the keeper's pidfd says it ended

    @property
    def returncode(self) -> int | None:
        if self.keeper_pidfd >= 0 and not select.select([self.keeper_pidfd], [], [], 0)[0]:
            return None
        return self._exit_code()

    def _exit_code(self) -> int:
        try:
            return int(json.loads((self.run_dir / EXIT_FILE).read_text())["code"])
        except (OSError, ValueError, KeyError, TypeError):
            return -int(signal.SIGKILL)  # the keeper was killed: so was its QEMU (PDEATHSIG)

    @property
    def fenced(self) -> bool:
        try:
            return bool(json.loads((self.run_dir / EXIT_FILE).read_text()).get("fenced"))
        except (OSError, ValueError, AttributeError):
            return False

    async def wait(self) -> int:
        """QEMU's exit code, once its keeper has ended (any number of waiters)."""
        if self.returncode is not None:
            return self._exit_code()
        if self._ended is None:
            import asyncio
            loop = asyncio.get_running_loop()
            ended = self._ended = loop.create_future()
            fd = self.keeper_pidfd

            def ready() -> None:
                loop.remove_reader(fd)
                if not ended.done():
                    ended.set_result(None)
            loop.add_reader(fd, ready)
        import asyncio
        await asyncio.shield(self._ended)
        return self._exit_code()

    def close(self) -> None:
        if self.keeper_pidfd >= 0:
            if self._ended is not None and not self._ended.done():
                self._ended.get_loop().remove_reader(self.keeper_pidfd)
                self._ended.cancel()
            os.close(self.keeper_pidfd)
            self.keeper_pidfd = -1


async def spawn(cmd: list[str], run_dir: Path, log: Path, deadline_file: Path, lease: int, check: float,
                fds: list[int], user: tuple[int, int, tuple[int, ...]] | None, env: dict[str, str]) -> Kept:
    """Start `cmd` (QEMU) under a new keeper, fenced by `lease`'s deadline in
    `deadline_file`; returns once it runs. `user`: uid, gid and extra groups to run it as
    (None: root); `env`: added to QEMU's environment only."""
    import asyncio
    for name in (KEEPER_FILE, EXIT_FILE, META_FILE):
        (run_dir / name).unlink(missing_ok=True)
    argv = [sys.executable, "-m", "ftvm.qemu.keeper", "--dir", str(run_dir), "--deadline", str(deadline_file),
            "--lease", f"{lease:x}", "--check", str(check), "--log", str(log), "--fds", ",".join(map(str, fds)),
            "--nice0", "--agent", str(os.getpid())]
    if user is not None:
        argv += ["--uid", str(user[0]), "--gid", str(user[1]), "--groups", ",".join(map(str, user[2]))]
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    proc = await asyncio.create_subprocess_exec(*argv, "--", *cmd, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, pass_fds=fds, start_new_session=True)
    assert proc.stdout is not None
    line = "error: the keeper did not start QEMU in time"
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), SPAWN_TIMEOUT_S)).decode(errors="replace").strip()
        await asyncio.wait_for(proc.stdout.read(), SPAWN_TIMEOUT_S)  # EOF: the keeper let go of the pipe
    except TimeoutError:
        pass
    await proc.wait()  # (the keeper's first half: it exits once the second has forked)
    if not line.startswith("qemu "):
        raise KeeperError(line.removeprefix("error: ") or "the keeper ended before starting QEMU")
    kept = attach(run_dir)
    if kept is None:
        raise KeeperError("QEMU ended as soon as it started")
    return kept


def attach(run_dir: Path) -> Kept | None:
    """The kept QEMU of `run_dir` if its keeper still runs (checked by start time, so a
    recycled PID is never taken for it), else None."""
    try:
        info = json.loads((run_dir / KEEPER_FILE).read_text())
        keeper, qemu = int(info["keeper"]), int(info["qemu"])
        keeper_start, qemu_start = int(info["keeper_start"]), int(info["qemu_start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        pidfd = os.pidfd_open(keeper)
    except OSError:
        return None
    try:
        if process_start(keeper) != keeper_start:
            raise OSError("PID reused")
    except OSError:
        os.close(pidfd)
        return None
    return Kept(qemu, qemu_start, keeper, pidfd, run_dir)


def find(root: Path) -> list[Kept]:
    """Every keeper still running for a run directory under `root` (the agent's `vms/`)."""
    found = []
    for info in sorted(root.glob(f"**/{KEEPER_FILE}")) if root.is_dir() else []:
        kept = attach(info.parent)
        if kept is not None:
            found.append(kept)
    return found


if __name__ == "__main__":
    sys.exit(main())
