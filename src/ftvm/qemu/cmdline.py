"""Build the QEMU command line for a VM (pure: nothing is run here)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.model import MAX_NICS, VmSpec
from .blockgraph import image_nodes
from .probe import Accel
from .runas import SANDBOX
from .tls import QemuTls

QEMU = "qemu-system-x86_64"

# Every VM's disks, at every level (a VM changes level while running, and a migration needs
# the same device on both ends): 64 descriptors, so the guest sees at most 62 segments per
# request (QEMU's seg-max-adjust) and splits a large write into ~248 KiB requests (with 4 KiB
# pages). At level 2 the partner then writes the first part while the rest is still on the
# wire. Measured on the lab, 1 MiB O_DSYNC writes, L2/L0 throughput: 256 (QEMU's default,
# 512 KiB requests) 0.79; 128: 0.82; 64: 0.90; 32: 0.80. Level 0 alone was unchanged (271
# vs 276-280 MiB/s), and 64 requests in flight per disk stay well above what guests queue.
DISK_QUEUE_SIZE = 64


@dataclass(frozen=True)
class VmPaths:
    """Per-VM runtime files on the host running it."""

    run_dir: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def serial(self) -> Path:
        """Everything the guest wrote to its serial console since this QEMU started."""
        return self.run_dir / "serial.log"

    @property
    def console(self) -> Path:
        """The serial console itself: one client at a time (`ftvm vm console`, api/console.py)."""
        return self.run_dir / "console.sock"

    @property
    def debug_qmp(self) -> Path:
        """A second QMP socket (lab only): fault injection without disturbing the agent's."""
        return self.run_dir / "qmp-debug.sock"

    @property
    def checkpoint_qmp(self) -> Path:
        """Level 3: the checkpoint path's own monitor (qemu/monitor.py)."""
        return self.run_dir / "qmp-checkpoint.sock"

    def nic_socket(self, index: int) -> Path:
        """Level 3: the relay's socket QEMU's NIC `index` connects to."""
        return self.run_dir / f"nic{index}.sock"


@dataclass(frozen=True)
class Checkpointed:
    """Level 3 launch: the guest's RAM file and whether QEMU waits for a device state."""

    ram_file: str
    incoming: bool = False


def checkpointed_disk_nodes(index: int, path: str) -> list[dict[str, Any]]:
    """A level 3 disk: a raw file through the host page cache (the checkpoint compares the
    file itself; guest flushes still reach the disk), its cache kept across the device-state
    save so `cont` stays cheap (FACTS.md)."""
    return [{"driver": "file", "node-name": f"disk{index}-file", "filename": path,
             "cache": {"direct": False}, "drop-cache": False},
            {"driver": "raw", "node-name": f"disk{index}", "file": f"disk{index}-file"}]


def tap_name(vm: str, nic: int = 0) -> str:
    """The tap of NIC `nic`: unique across every VM and NIC within the kernel's 15 bytes.
    Readable names start "ft-" (VM names hold no "."), hashed ones "ft" + hex (never "-"),
    and only a second or later NIC has a ".<n>": no two forms can meet.
      NIC 0:  ft-<name> (name up to 12)      else ft<13 hex>
      NIC n:  ft-<name>.<n> (name up to 10)  else ft<11 hex>.<n>"""
    assert 0 <= nic < MAX_NICS <= 10
    digest = hashlib.sha1(vm.encode()).hexdigest()
    if nic == 0:
        return f"ft-{vm}" if len(vm) <= 12 else f"ft{digest[:13]}"
    return f"ft-{vm}.{nic}" if len(vm) <= 10 else f"ft{digest[:11]}.{nic}"


def monitor(path: Path, name: str, fd: int | None, wait: bool = False) -> list[str]:
    """A QMP monitor on unix socket `path`. QEMU 7.2 moves a QMP socket's listener to its
    monitor thread after start, and a client that connects during the move races two
    watchers: the monitor thread could block in accept() for good and never read the
    client (seen: a test's first QMP command never answered), or a handshake came out
    wrong (seen once under load). So, given `fd` (a socket already listening at `path`,
    non-blocking: a stray accept() fails instead of blocking) and `wait`, QEMU accepts
    its first client before it sets the monitor up, and no connection can meet the
    move: the caller connects at once (the kernel queues it until QEMU accepts)."""
    if fd is None:
        return ["-qmp", f"unix:{path},server=on,wait=off"]
    return ["-chardev", f"socket,id={name},fd={fd},server=on,wait={'on' if wait else 'off'}",
            "-mon", f"chardev={name},mode=control"]


def listening_socket(path: Path) -> int:
    """A non-blocking unix socket listening at `path` (replacing any file there), for
    `monitor`; the caller passes the descriptor on, then closes its own."""
    import socket
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(16)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def build_cmdline(spec: VmSpec, paths: VmPaths, accel: Accel, taps: list[str],
                  blockdevs: list[list[dict[str, Any]]] | None = None, paused: bool = False,
                  debug_qmp: bool = False, checkpointed: Checkpointed | None = None,
                  incoming: bool = False, tls_dir: Path | None = None, tap_fds: list[int] | None = None,
                  monitor_fds: dict[Path, int] | None = None) -> list[str]:
    """`blockdevs` (levels 2, 3): per disk, the -blockdev nodes, the last one named disk<i>.
    Those disks stop the VM on an I/O error (werror/rerror=stop) so the agent can act.
    `checkpointed` (level 3): RAM in a shared file, NICs through the output-commit relay,
    and, to resume a replica, an incoming device state. `monitor_fds`: QMP sockets the
    caller made, listening and non-blocking, by path (see `monitor`)."""
    def qmp(path: Path, name: str, wait: bool = False) -> list[str]:
        return monitor(path, name, (monitor_fds or {}).get(path), wait)

    cmd = [
        # debug-threads: the vCPU threads are named ("CPU 0/TCG"), so an outside witness can
        # tell a QEMU that has run the guest from one still waiting for it (lab/observer.py)
        QEMU, "-name", f"guest={spec.name},process=ftvm-{spec.name},debug-threads=on",
        # the RAM block keeps the name "pc.ram" that plain `-m` gives it, so a running VM can
        # migrate into a checkpointed QEMU (raised to level 3 online) and back
        "-machine", "pc" + (",memory-backend=pc.ram" if checkpointed else ""),
        "-accel", accel.accel, "-cpu", accel.cpu,
        "-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        # the serial console: a socket an operator attaches to through the agent, logged whether
        # or not anyone is attached (with nobody there, the guest's output is only logged)
        "-chardev", f"socket,id=ser0,path={paths.console},server=on,wait=off,logfile={paths.serial}",
        "-serial", "chardev:ser0",
        *qmp(paths.qmp, "qmp", wait=True),  # (QemuVm.attach connects at once)
        "-sandbox", SANDBOX,
        # a guest kernel panic is reported (GUEST_PANICKED) and left to the agent, which
        # restarts the guest or gives up (agent/guest.py); the device has no migration state
        "-device", "pvpanic", "-action", "panic=none",
    ]
    if spec.watchdog:  # the guest's watchdog daemon kicks it; when it stops, QEMU resets the guest
        cmd += ["-device", "i6300esb", "-action", "watchdog=reset"]
    if tls_dir is not None:  # NBD to partners' copies and live migration: TLS-PSK (qemu/tls.py)
        cmd += QemuTls.qemu_objects(tls_dir)
    if checkpointed is not None:
        cmd += ["-object", f"memory-backend-file,id=pc.ram,size={spec.memory_mib}M,"
                           f"mem-path={checkpointed.ram_file},share=on",
                *qmp(paths.checkpoint_qmp, "qmp-checkpoint")]
        if checkpointed.incoming:
            cmd += ["-incoming", "defer"]
    if incoming and not (checkpointed and checkpointed.incoming):  # a live migration's target
        cmd += ["-incoming", "defer"]
    if debug_qmp:
        cmd += qmp(paths.debug_qmp, "qmp-debug")
    if paused:
        cmd += ["-S"]
    if spec.boot.kernel:
        append = spec.boot.append
        ip = spec.nics[0].ip if spec.nics else None
        if ip:
            append = f"{append} ftvm.ip={ip}".strip()
        cmd += ["-kernel", spec.boot.kernel]
        if spec.boot.initrd:
            cmd += ["-initrd", spec.boot.initrd]
        cmd += ["-append", append]
    for i, disk in enumerate(spec.disks):
        device = f"virtio-blk-pci,drive=disk{i},queue-size={DISK_QUEUE_SIZE}"
        if i == 0 and not spec.boot.kernel:
            device += ",bootindex=0"
        if blockdevs is not None:
            cmd += [x for node in blockdevs[i] for x in ("-blockdev", json.dumps(node))]
            cmd += ["-device", device + ",werror=stop,rerror=stop"]
            continue
        cmd += [x for node in image_nodes(i, disk.path, disk.format) for x in ("-blockdev", json.dumps(node))]
        cmd += ["-device", device]
    for i, (nic, tap) in enumerate(zip(spec.nics, taps, strict=True)):
        if checkpointed is not None:  # frames go through the relay, which owns the tap
            netdev = f"stream,id=net{i},server=off,addr.type=unix,addr.path={paths.nic_socket(i)}"
        else:
            # vnet_hdr=off: the NIC's state then matches a stream netdev's, so a running VM can
            # move into a checkpointed QEMU (raised to level 3 online)
            # the tap opened by the agent and passed as `fd` (an unprivileged QEMU cannot open
            # /dev/net/tun; opened without IFF_VNET_HDR, it has no vnet header either), else by name
            where = f"fd={tap_fds[i]}" if tap_fds else f"ifname={tap},script=no,downscript=no,vnet_hdr=off"
            netdev = f"tap,id=net{i},{where},vhost=off"
        cmd += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net{i},mac={nic.mac},romfile="]
    return cmd


def tap_names(spec: VmSpec) -> list[str]:
    return [tap_name(spec.name, i) for i in range(len(spec.nics))]
