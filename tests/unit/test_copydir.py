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


def test_a_level3_checkpoint_record_goes_aside_with_its_definitions_images(tmp_path: Path) -> None:
    """A partner's committed checkpoint (device state and record) lives in the copy
    directory: a VM defined again under the name finds no checkpoint to resume from."""
    from ftvm.agent.l3 import replica_paths
    from ftvm.core.model import Desired, DiskSpec, Level, NicSpec, VmSpec
    from ftvm.l3.standby import read_committed

    def spec(definition: str) -> VmSpec:
        return VmSpec("trade", Level.SYSTEM, 256, 1, (DiskSpec(size=1 << 20),), (NicSpec("52:54:00:00:00:03"),),
                      desired=Desired.RUNNING, definition=definition)

    storage = tmp_path / "local"
    old = replica_paths(spec("aa11"), tmp_path / "ram", storage)
    assert old.meta.parent == old.device_state.parent == old.disks[0].parent == storage / "trade"
    claim_copy_dir(storage / "trade", "aa11")
    old.device_state.write_bytes(b"old device state")
    old.meta.write_text('{"session": "s1", "epoch": 9}')
    assert read_committed(old) == ("s1", 9)
    new = replica_paths(spec("bb22"), tmp_path / "ram", storage)
    moved = claim_copy_dir(storage / "trade", "bb22")
    assert read_committed(new) is None and not new.device_state.exists()
    assert moved is not None and (moved / "l3-committed.json").exists()  # set aside with the images


def test_one_rule_names_every_copy(tmp_path: Path) -> None:
    from ftvm.agent.copydir import copy_image
    assert copy_image(tmp_path, "web", 1, "qcow2").path == str(tmp_path / "web" / "disk1.qcow2")
    assert copy_image(tmp_path, "web", 0, "raw").path == str(tmp_path / "web" / "disk0.img")
    assert copy_image(tmp_path, "web", 0, "raw").format == "raw"
