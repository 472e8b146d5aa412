"""The administrator's similarity commands: re-embedding the archive with a new model (and
resuming it), rebuilding an index from the catalog, and `precedent similar FILE`.

The archive is real ultrasound images (copies of a pydicom-data file, each study with its
own pixels shifted so studies differ), stored as the node stores received instances.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.catalog.models import ANALYSES, EMBEDDINGS
from node.catalog.recording import Catalog
from node.ingest import Ingestor, ReceivedInstance
from node.settings import Settings
from node.storage import ObjectStore
from tests.support.data import ultrasound_file
from tests.support.models import tiny_bundle
from tests.support.nodes import free_port, node_settings, run_precedent, write_config
from workers.bundles import load_bundle
from workers.index import SimilarityIndex
from workers.index_keeper import index_options, index_snapshot
from workers.reindex import re_embed, rebuild_index
from workers.similar_file import NotAnalysable, similar_to_file

STUDIES = 6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("models")
    return tiny_bundle(directory / "old.bundle", seed=1), tiny_bundle(directory / "new.bundle", seed=2)


def _study_files(directory: Path) -> list[Path]:
    """One image per study, each study's pixels rolled differently (different embeddings)."""
    source = pydicom.dcmread(ultrasound_file())
    pixels = source.pixel_array
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for study in range(STUDIES):
        ds = pydicom.dcmread(ultrasound_file())
        ds.PixelData = np.roll(pixels, study * 37, axis=1).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"REINDEX-{study}"
        path = directory / f"study{study}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def _archive(tmp_path: Path, bundle: Path) -> tuple[Settings, list[Path]]:
    settings = node_settings(
        tmp_path / "data", free_port(), "", model={"bundle": str(bundle), "batch_size": 1}
    )
    store = ObjectStore(settings.storage.data_dir, fsync=False, min_free_bytes=0)
    store.prepare()
    catalog = Catalog.open(settings.catalog_url())
    ingestor = Ingestor(store, catalog, max_instance_bytes=2**30, replace_duplicates=False)
    files = _study_files(tmp_path / "in")
    for path in files:
        copy = store.incoming_dir / path.name
        copy.write_bytes(path.read_bytes())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ingestor.ingest(ReceivedInstance(copy, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "TEST"))
    catalog.close()
    return settings, files


def _counts(settings: Settings, model_id: str) -> tuple[int, int]:
    catalog = Catalog.open(settings.catalog_url())
    try:
        with catalog.connection() as connection:
            done = connection.execute(
                select(func.count()).where(ANALYSES.c.model_id == model_id, ANALYSES.c.state == "done")
            ).scalar_one()
            vectors = connection.execute(
                select(func.count()).where(EMBEDDINGS.c.model_id == model_id)
            ).scalar_one()
    finally:
        catalog.close()
    return int(done), int(vectors)


def test_re_embedding_analyses_every_image_once_resumes_and_leaves_a_complete_index(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    settings, _ = _archive(tmp_path, bundles[0])
    new_id = load_bundle(bundles[1]).id
    calls = []

    def interrupt_after_first_batch(done: int, total: int) -> None:
        calls.append((done, total))
        if done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        re_embed(settings, bundles[1], interrupt_after_first_batch)
    interrupted_at = _counts(settings, new_id)
    assert 0 < interrupted_at[0] < STUDIES
    finished = re_embed(settings, bundles[1])
    assert (finished.analysed, finished.failed, finished.indexed) == (STUDIES, 0, STUDIES)
    assert _counts(settings, new_id) == (STUDIES, STUDIES)
    snapshot = index_snapshot(settings, new_id)
    assert snapshot is not None and snapshot.exists()
    reopened = SimilarityIndex(new_id, index_options(settings), snapshot)
    assert reopened.load() and len(reopened) == STUDIES


def test_rebuild_equals_the_index_kept_incrementally(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    settings, _ = _archive(tmp_path, bundles[0])
    re_embed(settings, bundles[0])
    model_id = load_bundle(bundles[0]).id
    snapshot = index_snapshot(settings, model_id)
    assert snapshot is not None
    snapshot.unlink()  # the catalog is the truth: nothing is lost
    assert rebuild_index(settings, model_id) == STUDIES
    catalog = Catalog.open(settings.catalog_url())
    try:
        incremental = SimilarityIndex(model_id, index_options(settings))
        incremental.sync(catalog)
        rebuilt = SimilarityIndex(model_id, index_options(settings), snapshot)
        assert rebuilt.load()
        probe = np.random.default_rng(0).normal(size=(3, rebuilt.dimension or 0)).astype(np.float32)
        assert incremental.search(probe, STUDIES) == rebuilt.search(probe, STUDIES)
    finally:
        catalog.close()


def test_similar_file_finds_the_study_with_the_same_pixels_first(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    settings, files = _archive(tmp_path, bundles[0])
    re_embed(settings, bundles[0])
    stranger = pydicom.dcmread(files[3])  # the same pixels as study 3, as another study
    stranger.StudyInstanceUID = generate_uid()
    stranger.SOPInstanceUID = stranger.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stranger.PatientID = "SOMEONE-ELSE"
    path = tmp_path / "stranger.dcm"
    stranger.save_as(path)
    found = similar_to_file(settings, path, 3)
    study3 = str(pydicom.dcmread(files[3]).StudyInstanceUID)
    assert found.cases[0].study_instance_uid == study3
    assert found.cases[0].distance < 1e-4
    assert [case.rank for case in found.cases] == [1, 2, 3]
    own = similar_to_file(settings, files[3], 3)  # a stored study is never its own match
    assert study3 not in {case.study_instance_uid for case in own.cases}


def test_the_commands_answer_and_refuse_clearly(tmp_path: Path, bundles: tuple[Path, Path]) -> None:
    settings, files = _archive(tmp_path, bundles[0])
    config = write_config(
        tmp_path / "precedent.toml",
        f'[storage]\ndata_dir = "{settings.storage.data_dir}"\nmin_free_bytes = 0\n'
        f'[model]\nbundle = "{bundles[0]}"\n',
    )
    embedded = run_precedent("reindex", "--re-embed", "--model", str(bundles[0]), "--config", str(config))
    assert embedded.returncode == 0, embedded.stderr
    assert f"{STUDIES} images embedded, 0 failed, {STUDIES} indexed" in embedded.stdout
    rebuilt = run_precedent("reindex", "--config", str(config))
    assert rebuilt.returncode == 0 and f"{STUDIES} vectors" in rebuilt.stdout, rebuilt.stderr
    answer = run_precedent("similar", str(files[0]), "--k", "2", "--json", "--config", str(config))
    assert answer.returncode == 0, answer.stderr
    cases = json.loads(answer.stdout)["cases"]
    assert len(cases) == 2 and all(c["study_instance_uid"] for c in cases)
    text = tmp_path / "not-dicom.dcm"
    text.write_text("hello")
    refused = run_precedent("similar", str(text), "--config", str(config))
    assert refused.returncode == 1 and "cannot be read as DICOM" in refused.stderr
    with pytest.raises(NotAnalysable):
        similar_to_file(settings, text, 2)
    mismatched = run_precedent("reindex", "--re-embed", "--config", str(config))
    assert mismatched.returncode == 2 and "--re-embed and --model go together" in mismatched.stderr
