"""The web dashboard in a real headless browser (Debian's chromium) against a lab pool:
it shows the pool, updates itself, and a failover shows up (DOM and screenshot)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from ftvm import ops
from ftvm.core.model import Level
from ftvm.lab import lab as labmod
from ftvm.lab import topology as topo
from ftvm.pki import spki_sha256
from ftvm.lab.scenario import LabPool

pytestmark = pytest.mark.lab

RED = (0xB3, 0x26, 0x1E)    # .bad: Not protected
GREEN = (0x0A, 0x7A, 0x2F)  # .ok


def chromium(url: str, profile: Path, *extra: str, pin: Path | None = None) -> str:
    """`pin`: the agent's certificate, whose key chromium is told to trust (its CA is the
    pool's own, which the browser does not know)."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not installed: run ./setup.sh test (the README's test command)")
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=4000", "--window-size=1400,1000", *extra,
         *([f"--ignore-certificate-errors-spki-list={spki_sha256(pin)}"] if pin else []), url],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def png_pixels(path: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB/RGBA non-interlaced PNG (what chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev = zlib.decompress(idat), width * bpp, bytearray(width * bpp)
    pixels = []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        pixels += [tuple(line[x * bpp:x * bpp + 3]) for x in range(width)]  # type: ignore[misc]
        prev = line
    return width, height, pixels  # type: ignore[return-value]


def count_colour(pixels: list[tuple[int, int, int]], rgb: tuple[int, int, int], tol: int = 40) -> int:
    return sum(1 for p in pixels if all(abs(p[i] - rgb[i]) <= tol for i in range(3)))


def test_dashboard_shows_the_pool_and_a_failover(lab: labmod.LabState, guest_image, tmp_path: Path) -> None:
    pool = LabPool(lab)
    pool.define_ledger_vm("dash", 30, Level.RESTART, guest_image, host="h1")
    pool.run(lambda s: ops.set_dr_target(s, "far", [topo.dr_receiver("h2")]))
    pool.define_ledger_vm("dashdr", 31, Level.RESTART, guest_image, host="h1", dr_target="far", dr_rpo_s=30.0)
    token = lab.api_read_token_file.read_text().strip()  # the dashboard only reads
    url = lab.api_url("h2") + f"/#token={token}"
    pin = lab.pki_dir / "hosts" / "h2.crt"
    try:
        pool.wait_running("dash", 60)
        pool.wait_for("protected", lambda s: s.vms["dash"].status is not None, 30)
        pool.wait_for("a DR point of dashdr",
                      lambda s: s.vms["dashdr"].dr is not None and s.vms["dashdr"].dr.newest > 0, 90)
        dom = chromium(url, tmp_path / "p1", "--dump-dom", pin=pin)
        assert 'data-vm="dash" data-host="h1" data-protected="true"' in dom, dom[-3000:]
        dr_row = dom[dom.index('data-vm="dashdr"'):]
        dr_row = dr_row[:dr_row.index("</tr>")]
        assert 'data-dr="within"' in dr_row and "/ 30 s to far" in dr_row, dr_row  # its DR lag against its RPO
        assert "reachable" in dom and "claim" in dom  # quorum line and the live event log
        before = tmp_path / "before.png"
        chromium(url, tmp_path / "p2", f"--screenshot={before}", pin=pin)
        _, _, px_before = png_pixels(before)
        assert count_colour(px_before, GREEN) > 50 and count_colour(px_before, RED) == 0

        labmod.fail_host(lab, "h1")
        pool.wait_running("dash", 60, not_on="h1")
        dom = chromium(url, tmp_path / "p3", "--dump-dom", pin=pin)
        assert 'data-vm="dash" data-host="h2" data-protected="false"' in dom, dom[-3000:]
        assert "taking over" in dom or "lost" in dom  # the failover's decision, with its reason
        assert 'data-host="h1" data-state="down"' in dom  # the lost host is shown down
        # the availability panel counts the outage and the failover
        row = dom[dom.index('data-avail="dash"'):]
        row = row[:row.index("</tr>")]
        cells = [c.split(">", 1)[1] for c in row.split("<td")[1:]]
        assert cells[4:6] == ["1</td>", "1</td>"], cells
        assert "host h1 lost" in cells[7], cells
        after = tmp_path / "after.png"
        chromium(url, tmp_path / "p4", f"--screenshot={after}", pin=pin)
        w, h, px_after = png_pixels(after)
        assert (w, h) == (1400, 1000)
        assert count_colour(px_after, RED) > 50  # "Not protected: ..." now shows in red
        # without the token the page asks for it and shows no pool data
        dom = chromium(lab.api_url("h2") + "/", tmp_path / "p5", "--dump-dom", pin=pin)
        assert 'data-vm="dash"' not in dom and 'id="login" style="display: block;"' in dom
    finally:
        for h in list(lab.failed):
            labmod.restore_host(lab, h)
        labmod.wait_for_hosts(lab, lab.hosts, 30)
        pool.stop_and_remove("dash")
        pool.stop_and_remove("dashdr")
        pool.run(lambda s: ops.remove_dr_target(s, "far"))
