"""A copy directory belongs to one VM definition; another's is set aside, never reused."""

from __future__ import annotations

from pathlib import Path

from ftvm.agent.copydir import MARKER, claim_copy_dir


def test_a_new_definition_sets_the_old_images_aside(tmp_path: Path) -> None:
    d = tmp_path / "web"
    assert claim_copy_dir(d, "aa11") is None
    (d / "disk0.img").write_bytes(b"old guest data")
    assert claim_copy_dir(d, "aa11") is None  # the same VM: kept
    assert (d / "disk0.img").read_bytes() == b"old guest data"
    moved = claim_copy_dir(d, "bb22")  # a VM defined again under the same name
    assert moved is not None and moved.parent == tmp_path and "aa11" in moved.name
    assert (moved / "disk0.img").read_bytes() == b"old guest data"  # set aside, not deleted
    assert sorted(p.name for p in d.iterdir()) == [MARKER]
    assert (d / MARKER).read_text().strip() == "bb22"


def test_directories_from_before_markers_are_adopted(tmp_path: Path) -> None:
    d = tmp_path / "db"
    d.mkdir()
    (d / "disk0.img").write_bytes(b"x")
    assert claim_copy_dir(d, "cc33") is None
    assert (d / "disk0.img").exists() and (d / MARKER).read_text().strip() == "cc33"
    assert claim_copy_dir(tmp_path / "legacy", "") is None  # a spec without a definition
    assert not (tmp_path / "legacy" / MARKER).exists()
