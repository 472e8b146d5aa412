"""The object store: hashed paths, atomic placement, and clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.errors import StorageUnavailable
from node.storage import ObjectStore


def make_store(tmp_path: Path, min_free_bytes: int = 0) -> ObjectStore:
    store = ObjectStore(tmp_path / "data", fsync=True, min_free_bytes=min_free_bytes)
    store.prepare()
    return store


def received(store: ObjectStore, content: bytes = b"DICM-ish content") -> Path:
    path = store.incoming_dir / "tmp123.dcm"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("uid", ["1.2.3.4", "../../../etc/passwd", "/abs/path", "a\x00b", "é" * 80])
def test_paths_are_hashes_inside_objects(tmp_path: Path, uid: str) -> None:
    store = make_store(tmp_path)
    relative = store.relative_path(uid)
    assert relative.parts[0] == "objects"
    assert len(relative.parts) == 3
    assert relative.name.removesuffix(".dcm").isalnum()
    assert store.absolute(relative).resolve().is_relative_to(store.objects_dir)


def test_placing_moves_the_whole_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    source = received(store, b"x" * 100_000)
    placed = store.place(source, "1.2.3.4")
    assert not source.exists()
    assert store.absolute(placed.relative_path).read_bytes() == b"x" * 100_000
    assert placed.size == 100_000
    assert list(store.incoming_dir.iterdir()) == []


def test_placing_again_replaces(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.place(received(store, b"first"), "1.2.3.4")
    placed = store.place(received(store, b"second"), "1.2.3.4")
    assert store.absolute(placed.relative_path).read_bytes() == b"second"


def test_placing_across_filesystems_copies(tmp_path: Path) -> None:
    """A received file on another filesystem (here tmpfs) is copied, then removed."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.fail("this test needs /dev/shm on a filesystem other than the temp directory")
    store = make_store(tmp_path)
    source = shm / f"precedent-test-{tmp_path.name}.dcm"
    source.write_bytes(b"across")
    placed = store.place(source, "1.2.3.5")
    assert store.absolute(placed.relative_path).read_bytes() == b"across"
    assert not source.exists()
    assert not list(store.absolute(placed.relative_path).parent.glob("*.partial"))


def test_start_up_makes_the_fan_out_directories(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert sorted(p.name for p in store.objects_dir.iterdir()) == [f"{n:02x}" for n in range(256)]
    assert store.relative_path("1.2.3").parent.name in {p.name for p in store.objects_dir.iterdir()}


def test_holds_tells_whether_a_file_is_stored(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert not store.holds("1.2.3.4")
    store.place(received(store), "1.2.3.4")
    assert store.holds("1.2.3.4")


def test_start_up_purges_half_received_files_only(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    kept = store.place(received(store), "1.2.3.4")
    (store.incoming_dir / "tmpa.dcm").write_bytes(b"partial")
    (store.incoming_dir / "tmpb.dcm").write_bytes(b"partial")
    assert ObjectStore(store.data_dir, fsync=True, min_free_bytes=0).prepare() == 2
    assert list(store.incoming_dir.iterdir()) == []
    assert store.absolute(kept.relative_path).exists()


def test_an_unwritable_objects_directory_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    shutil.rmtree(store.objects_dir)
    store.objects_dir.write_bytes(b"not a directory")
    source = received(store)
    with pytest.raises(StorageUnavailable, match="cannot write"):
        store.place(source, "1.2.3.4")
    assert source.exists(), "nothing is lost: the received file stays for the caller to discard"


def test_low_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    store = make_store(tmp_path, min_free_bytes=2**62)
    with pytest.raises(StorageUnavailable, match=r"storage\.min_free_bytes"):
        store.require_free_space()
