"""The similarity index: exact where it says so, close where it is approximate, in step
with the catalog, restartable from a snapshot that is only ever a cache, and searchable
while it grows."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pytest
from sqlalchemy import delete, insert

from node.catalog.analyses import AnalysisRecords, ModelRecord
from node.catalog.embeddings import EmbeddingError, EmbeddingRecords
from node.catalog.models import EMBEDDINGS
from node.catalog.recording import Catalog
from tests.bench.bench_index import clustered_vectors, insert_embeddings, insert_instances
from tests.support.postgres import scratch_database
from workers.index import (
    DimensionMismatch,
    IndexKind,
    IndexOptions,
    Match,
    Metric,
    SimilarityIndex,
    Structure,
    UnknownInstance,
    UnknownModel,
    VectorIndex,
    snapshot_path,
)

MODEL = "c" * 64
OTHER_MODEL = "d" * 64
FLAT = IndexOptions(kind="flat")


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    yield catalog
    catalog.close()


@pytest.fixture
def one_openmp_thread() -> Iterator[None]:
    """FAISS's OpenMP threads spin while they wait: on a machine whose cores are busy with
    other work (a CI runner, the other tests), two threads build an HNSW graph several
    times slower than one. Deployments set ``OMP_WAIT_POLICY=PASSIVE`` instead."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    """Plain Gaussian vectors: every distance distinct, so exact rankings have no ties."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def store(catalog: Catalog, vectors: np.ndarray, model: str = MODEL) -> np.ndarray:
    """New instances with these embeddings of ``model``; their pks."""
    pks = insert_instances(catalog, len(vectors))
    insert_embeddings(catalog, model, pks, vectors)
    return pks


def brute_force(data: np.ndarray, query: np.ndarray, metric: Metric) -> np.ndarray:
    """Distances from ``query`` to every row, as the index documents them, in float64."""
    data, query = data.astype(np.float64), query.astype(np.float64)
    distances: np.ndarray
    if metric == "l2":
        distances = np.sqrt(((data - query) ** 2).sum(axis=1))
    else:
        distances = 1.0 - data @ query / (np.linalg.norm(data, axis=1) * np.linalg.norm(query))
    return distances


def pairs(matches: list[Match]) -> list[tuple[int, float]]:
    return [(m.instance_pk, round(m.distance, 5)) for m in matches]


def answers(index: SimilarityIndex, queries: np.ndarray, k: int = 10) -> list[list[tuple[int, float]]]:
    return [pairs(found) for found in index.search(queries, k)]


# ------------------------------------------------------------------------------------------
# Exact and approximate search


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_search_is_brute_force(catalog: Catalog, metric: Metric) -> None:
    data, queries = gaussian(400, 16, seed=1), gaussian(15, 16, seed=2)
    pks = store(catalog, data)
    index = SimilarityIndex.open(catalog, MODEL, IndexOptions(kind="flat", metric=metric))

    assert index.kind == "flat"
    for query, found in zip(queries, index.search(queries, 25), strict=True):
        distances = brute_force(data, query, metric)
        order = np.argsort(distances)[:25]
        assert [m.instance_pk for m in found] == pks[order].tolist()
        np.testing.assert_allclose([m.distance for m in found], distances[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "metric"), [("hnsw", "cosine"), ("hnsw", "l2"), ("ivfpq", "cosine"), ("ivfpq", "l2")]
)
@pytest.mark.usefixtures("one_openmp_thread")
def test_approximate_kinds_find_the_exact_neighbours(kind: Structure, metric: Metric) -> None:
    everything = clustered_vectors(20_100, 64, seed=3)
    data, queries = everything[:20_000], everything[20_000:]
    ids = np.arange(data.shape[0])
    exact = VectorIndex.build("flat", metric, IndexOptions(kind="flat", metric=metric), ids, data)
    approximate = VectorIndex.build(kind, metric, IndexOptions(kind=kind, metric=metric), ids, data)

    truth = exact.search(queries, 10)
    found = approximate.search(queries, 10)

    recall = np.mean(
        [
            len({m.instance_pk for m in a} & {m.instance_pk for m in t}) / 10
            for a, t in zip(found, truth, strict=True)
        ]
    )
    assert recall >= 0.9, f"{kind} {metric}: recall@10 {recall:.3f}"
    for query, matches in zip(queries, found, strict=True):  # distances are exact, re-computed on the vectors
        reported = [m.distance for m in matches]
        expected = brute_force(data[[m.instance_pk for m in matches]], query, metric)
        np.testing.assert_allclose(reported, expected, rtol=1e-4, atol=1e-4)
        assert reported == sorted(reported)


def test_excluded_and_refused_instances_leave_k_others(catalog: Catalog) -> None:
    data, query = gaussian(300, 8, seed=4), gaussian(1, 8, seed=5)[0]
    pks = store(catalog, data)
    index = SimilarityIndex.open(catalog, MODEL, FLAT)
    ranked = pks[np.argsort(brute_force(data, query, "cosine"))].tolist()

    (without_nearest,) = index.search(query, 10, exclude=ranked[:40])
    (even_only,) = index.search(query, 10, keep=lambda pk: pk % 2 == 0)

    assert [m.instance_pk for m in without_nearest] == ranked[40:50]
    assert [m.instance_pk for m in even_only] == [pk for pk in ranked if pk % 2 == 0][:10]


@pytest.mark.usefixtures("one_openmp_thread")
def test_an_approximate_index_over_fetches_past_exclusions_and_filters() -> None:
    data = clustered_vectors(3000, 32, seed=6)
    index = VectorIndex.build("hnsw", "cosine", IndexOptions(kind="hnsw"), np.arange(3000), data)
    (nearest,) = index.search(data[0], 200)

    (unexcluded,) = index.search(data[0], 10, exclude=[m.instance_pk for m in nearest])
    (rare,) = index.search(data[0], 10, keep=lambda pk: pk % 97 == 0)  # 1 candidate in 97 kept

    assert len(unexcluded) == 10
    assert not {m.instance_pk for m in unexcluded} & {m.instance_pk for m in nearest}
    assert len(rare) == 10 and all(m.instance_pk % 97 == 0 for m in rare)
    assert [m.distance for m in rare] == sorted(m.distance for m in rare)


@pytest.mark.usefixtures("one_openmp_thread")
def test_a_plain_ivfpq_index_keeps_codes_only_and_still_fills_k() -> None:
    data = clustered_vectors(3000, 32, seed=60)
    options = IndexOptions(kind="ivfpq", ivfpq_refine=False, nprobe=2)
    index = VectorIndex.build("ivfpq", "l2", options, np.arange(3000), data)

    (rare,) = index.search(data[0], 10, keep=lambda pk: pk % 97 == 0)  # beyond 2 of 32 lists

    assert len(rare) == 10 and all(m.instance_pk % 97 == 0 for m in rare)
    assert index.vector_of(0) is None  # search_instance then reads the catalog


def test_search_instance_uses_the_stored_vector_and_never_answers_itself(catalog: Catalog) -> None:
    data = gaussian(200, 8, seed=7)
    pks = store(catalog, data)
    index = SimilarityIndex.open(catalog, MODEL, FLAT)
    late = store(catalog, gaussian(1, 8, seed=8))  # committed, not synced yet

    found = index.search_instance(int(pks[3]), 5)
    late_found = index.search_instance(int(late[0]), 5, catalog=catalog)

    assert pairs(found) == pairs(index.search(data[3], 5, exclude=[pks[3]])[0])
    assert int(pks[3]) not in [m.instance_pk for m in found]
    assert len(late_found) == 5
    with pytest.raises(UnknownInstance, match=f"instance {late[0]} has no embedding"):
        index.search_instance(int(late[0]), 5)


# ------------------------------------------------------------------------------------------
# Following the catalog


def test_incremental_sync_equals_a_full_rebuild(catalog: Catalog) -> None:
    first = store(catalog, gaussian(120, 12, seed=9))
    index = SimilarityIndex.open(catalog, MODEL, FLAT)
    for step in range(3):
        store(catalog, gaussian(40, 12, seed=10 + step))
        store(catalog, gaussian(25, 12, seed=20 + step), model=OTHER_MODEL)  # interleaved ids
        assert index.sync(catalog) == 40
    replaced = int(first[5])  # re-analysed: the old embedding deleted, a new one written
    with catalog.transaction() as connection:
        connection.execute(delete(EMBEDDINGS).where(EMBEDDINGS.c.instance_pk == replaced))
    insert_embeddings(catalog, MODEL, [replaced], gaussian(1, 12, seed=30))
    assert index.sync(catalog) == 1

    rebuilt = SimilarityIndex.open(catalog, MODEL, FLAT)
    queries = gaussian(10, 12, seed=31)

    assert len(index) == len(rebuilt) == 240
    assert answers(index, queries, 30) == answers(rebuilt, queries, 30)
    assert index.search_instance(replaced, 3) == rebuilt.search_instance(replaced, 3)


def test_new_embeddings_are_searchable_after_one_short_sync(catalog: Catalog) -> None:
    store(catalog, gaussian(5000, 32, seed=32))
    index = SimilarityIndex.open(catalog, MODEL, FLAT)
    new_vectors = gaussian(100, 32, seed=33)
    new = store(catalog, new_vectors)

    started = time.perf_counter()
    added = index.sync(catalog)
    seconds = time.perf_counter() - started

    assert added == 100
    assert seconds < 0.5, f"a sync of 100 rows took {seconds:.2f} s"
    assert [found[0].instance_pk for found in index.search(new_vectors, 1)] == new.tolist()
    assert index.sync(catalog) == 0


def test_a_row_committed_below_the_high_water_mark_is_still_found(catalog: Catalog) -> None:
    """On PostgreSQL a transaction may commit after one that took a later id: the sync
    remembers the ids it walked past that were missing and asks for them again."""
    pks = insert_instances(catalog, 12)
    vectors = gaussian(12, 4, seed=34)
    write = [
        {
            "id": i + 1,
            "instance_pk": int(pks[i]),
            "model_id": MODEL,
            "dimension": 4,
            "vector": vectors[i].tobytes(),
            "created_at": datetime.now(UTC),
        }
        for i in range(12)
    ]
    late = write.pop(5)  # id 6
    with catalog.transaction() as connection:
        connection.execute(insert(EMBEDDINGS), write)
    index = SimilarityIndex.open(catalog, MODEL, FLAT)
    assert (len(index), index.high_water) == (11, 12)

    with catalog.transaction() as connection:
        connection.execute(insert(EMBEDDINGS), [late])

    assert index.sync(catalog) == 1
    assert index.search(vectors[5], 1)[0][0].instance_pk == pks[5]


@pytest.mark.usefixtures("one_openmp_thread")
def test_auto_turns_flat_into_hnsw_past_the_threshold(catalog: Catalog) -> None:
    options = IndexOptions(kind="auto", flat_max_vectors=300, large_kind="hnsw")
    store(catalog, clustered_vectors(300, 16, seed=35))
    index = SimilarityIndex.open(catalog, MODEL, options)
    assert index.kind == "flat"

    store(catalog, clustered_vectors(50, 16, seed=36))
    index.sync(catalog)

    assert (index.kind, len(index)) == ("hnsw", 350)
    assert SimilarityIndex.open(catalog, MODEL, options).kind == "hnsw"


@pytest.mark.parametrize("kind", ["ivfpq", "auto"])
def test_ivfpq_stays_flat_until_it_can_be_trained(catalog: Catalog, kind: IndexKind) -> None:
    options = IndexOptions(kind=kind, flat_max_vectors=300, ivf_nlist=16, pq_bits=4)  # trains at 640
    data = clustered_vectors(700, 16, seed=37)
    pks = store(catalog, data[:500])
    index = SimilarityIndex.open(catalog, MODEL, options)
    assert index.kind == "flat"

    pks = np.concatenate([pks, store(catalog, data[500:])])
    index.sync(catalog)

    assert (index.kind, len(index)) == ("ivfpq", 700)
    assert [found[0].instance_pk for found in index.search(data[:20], 1)] == pks[:20].tolist()


def test_rebuild_reports_progress_and_refuses_an_unknown_model(catalog: Catalog) -> None:
    store(catalog, gaussian(12_000, 4, seed=38))
    index = SimilarityIndex(MODEL, FLAT)
    seen: list[tuple[int, int]] = []

    assert index.rebuild(catalog, progress=lambda done, total: seen.append((done, total))) == 12_000

    assert seen == [(5000, 12_000), (10_000, 12_000), (12_000, 12_000)]
    with pytest.raises(UnknownModel, match=OTHER_MODEL):
        SimilarityIndex(OTHER_MODEL).rebuild(catalog)
    AnalysisRecords(catalog).register_model(ModelRecord(OTHER_MODEL, "cnn4", ["a", "b"], False, {}))
    assert SimilarityIndex(OTHER_MODEL).rebuild(catalog) == 0


# ------------------------------------------------------------------------------------------
# Clear answers to bad questions


def test_an_empty_index_answers_nothing(catalog: Catalog) -> None:
    index = SimilarityIndex.open(catalog, MODEL)

    assert (len(index), index.kind) == (0, None)
    assert index.search(np.ones((2, 8), np.float32), 5) == [[], []]
    with pytest.raises(UnknownInstance):
        index.search_instance(1, 5, catalog=catalog)


def test_dimension_mismatches_are_named(catalog: Catalog) -> None:
    store(catalog, gaussian(10, 8, seed=39))
    index = SimilarityIndex.open(catalog, MODEL, FLAT)

    with pytest.raises(
        DimensionMismatch, match=f"model {MODEL}: vectors have 9 dimensions, the index holds 8"
    ):
        index.search(np.ones(9, np.float32), 5)
    store(catalog, gaussian(3, 16, seed=40))
    with pytest.raises(DimensionMismatch, match="has 16 dimensions, the model's index 8"):
        index.sync(catalog)
    with pytest.raises(EmbeddingError, match="dimension 16, but embedding 1 of the same model has 8"):
        index.rebuild(catalog)  # read in one batch with the earlier rows


def test_a_damaged_embedding_row_is_named(catalog: Catalog) -> None:
    pks = insert_instances(catalog, 1)
    insert_embeddings(catalog, MODEL, pks, gaussian(1, 8, seed=41))
    with catalog.transaction() as connection:
        connection.execute(EMBEDDINGS.update().values(vector=b"\x00" * 12))

    with pytest.raises(EmbeddingError, match="12 bytes stored, 32 expected for dimension 8"):
        EmbeddingRecords(catalog).of_instances(MODEL, pks.tolist())


def test_vectors_with_nan_are_skipped_with_a_warning(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    data = gaussian(5, 4, seed=42)
    data[2, 1] = np.nan
    store(catalog, data)

    with caplog.at_level(logging.WARNING, logger="workers.index"):
        index = SimilarityIndex.open(catalog, MODEL, FLAT)

    assert len(index) == 4
    assert "skipped 1 embeddings with NaN" in caplog.text


def test_options_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="kind must be one of auto, flat, ivfpq, hnsw, not 'annoy'"):
        IndexOptions(kind="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nprobe must be an integer of at least 1"):
        IndexOptions(nprobe=0)
    with pytest.raises(DimensionMismatch, match="pq_m = 5 does not divide the dimension 64"):
        VectorIndex.build("ivfpq", "l2", IndexOptions(pq_m=5), np.arange(3000), clustered_vectors(3000, 64))
    with pytest.raises(ValueError, match="not a hexadecimal digest"):
        snapshot_path(Path("/tmp"), "../etc")


# ------------------------------------------------------------------------------------------
# Snapshots


@pytest.mark.usefixtures("one_openmp_thread")
def test_a_snapshot_restores_the_index_and_the_sync_brings_the_rest(
    catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = snapshot_path(tmp_path / "index", MODEL)
    store(catalog, clustered_vectors(600, 16, seed=43))
    built = SimilarityIndex.open(catalog, MODEL, IndexOptions(kind="hnsw"), path)  # rebuilt, then saved
    queries = clustered_vectors(10, 16, seed=44)
    assert path.exists()
    store(catalog, clustered_vectors(30, 16, seed=45))

    with caplog.at_level(logging.INFO, logger="workers.index"):
        reopened = SimilarityIndex.open(catalog, MODEL, IndexOptions(kind="hnsw", hnsw_ef_search=64), path)
    built.sync(catalog)

    assert "loaded from" in caplog.text and "rebuilt" not in caplog.text
    assert (len(reopened), reopened.high_water) == (630, built.high_water)
    assert answers(reopened, queries) == answers(built, queries)


def test_without_its_snapshot_the_index_is_rebuilt(catalog: Catalog, tmp_path: Path) -> None:
    path = snapshot_path(tmp_path, MODEL)
    store(catalog, gaussian(100, 8, seed=46))
    first = SimilarityIndex.open(catalog, MODEL, FLAT, path)
    path.unlink()

    again = SimilarityIndex.open(catalog, MODEL, FLAT, path)

    queries = gaussian(5, 8, seed=47)
    assert answers(again, queries) == answers(first, queries)
    assert path.exists()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty", "garbage"])
def test_a_damaged_snapshot_is_rebuilt_with_a_warning(
    catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = snapshot_path(tmp_path, MODEL)
    store(catalog, gaussian(100, 8, seed=48))
    first = SimilarityIndex.open(catalog, MODEL, IndexOptions(kind="hnsw"), path)
    content = bytearray(path.read_bytes())
    if damage == "flipped byte":
        content[len(content) // 2] ^= 0x40
    elif damage == "truncated":
        del content[-100:]
    elif damage == "empty":
        content = bytearray()
    else:
        content = bytearray(b"\x07" * 5000)
    path.write_bytes(bytes(content))

    with caplog.at_level(logging.WARNING, logger="workers.index"):
        again = SimilarityIndex.open(catalog, MODEL, IndexOptions(kind="hnsw"), path)

    assert "not used" in caplog.text and "rebuilding from the catalog" in caplog.text
    queries = gaussian(5, 8, seed=49)
    assert answers(again, queries) == answers(first, queries)
    assert SimilarityIndex(MODEL, IndexOptions(kind="hnsw"), path).load()  # rewritten, whole


def test_a_snapshot_of_another_model_or_structure_is_not_used(
    catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store(catalog, gaussian(50, 8, seed=50))
    store(catalog, gaussian(20, 8, seed=51), model=OTHER_MODEL)
    SimilarityIndex.open(catalog, MODEL, FLAT, tmp_path / "model.snapshot")
    shutil.copy(tmp_path / "model.snapshot", tmp_path / "other.snapshot")

    with caplog.at_level(logging.WARNING, logger="workers.index"):
        other = SimilarityIndex.open(catalog, OTHER_MODEL, FLAT, tmp_path / "other.snapshot")
        as_l2 = SimilarityIndex(MODEL, replace(FLAT, metric="l2"), tmp_path / "model.snapshot")

        assert not as_l2.load()

    assert len(other) == 20
    assert f"made for model {MODEL}, not {OTHER_MODEL}" in caplog.text
    assert "made with other index options" in caplog.text
    assert SimilarityIndex(MODEL, replace(FLAT, sync_batch=7), tmp_path / "model.snapshot").load()


# ------------------------------------------------------------------------------------------
# Concurrency


@pytest.mark.usefixtures("one_openmp_thread")
def test_searches_go_on_while_a_sync_adds_vectors(catalog: Catalog) -> None:
    store(catalog, clustered_vectors(1000, 32, seed=52))
    index = SimilarityIndex.open(catalog, MODEL, IndexOptions(kind="hnsw"))
    new = store(catalog, clustered_vectors(3000, 32, seed=53))
    known = set(range(1, int(new.max()) + 1))
    queries = clustered_vectors(50, 32, seed=54)
    failures: list[BaseException] = []
    syncing = threading.Thread(target=lambda: failures.extend(_run(lambda: index.sync(catalog))))

    latencies: list[float] = []
    sizes: list[int] = []
    syncing.start()
    while syncing.is_alive():
        started = time.perf_counter()
        found = index.search(queries[len(latencies) % 50], 10)[0]
        latencies.append(time.perf_counter() - started)
        sizes.append(len(index))
        assert len(found) == 10 and {m.instance_pk for m in found} <= known
    syncing.join()

    assert failures == []
    assert len(index) == 4000
    assert len(latencies) > 10 and sizes[0] < sizes[-1]  # searched while it grew
    assert max(latencies) < 1.0, f"a search waited {max(latencies):.2f} s for the adds"


def _run(action: Callable[[], object]) -> list[BaseException]:
    try:
        action()
    except BaseException as exc:  # reported to the test's thread
        return [exc]
    return []


# ------------------------------------------------------------------------------------------
# PostgreSQL


def test_on_postgresql_late_commits_are_found_and_sync_equals_rebuild() -> None:
    with scratch_database() as url:
        catalog = Catalog.open(url)
        try:
            pks = insert_instances(catalog, 60)
            vectors = gaussian(60, 8, seed=55)
            insert_embeddings(catalog, MODEL, pks[:40], vectors[:40])
            index = SimilarityIndex.open(catalog, MODEL, FLAT)
            with catalog.engine.connect() as slow:  # takes its id first, commits last
                with slow.begin():
                    slow.execute(insert(EMBEDDINGS), [_row(int(pks[40]), vectors[40])])
                    insert_embeddings(catalog, MODEL, pks[41:], vectors[41:])
                    assert index.sync(catalog) == 19
                assert index.sync(catalog) == 1

            rebuilt = SimilarityIndex.open(catalog, MODEL, FLAT)
            assert len(index) == len(rebuilt) == 60
            assert answers(index, vectors[:10]) == answers(rebuilt, vectors[:10])
        finally:
            catalog.close()


def _row(instance_pk: int, vector: np.ndarray) -> dict[str, object]:
    return {
        "instance_pk": instance_pk,
        "model_id": MODEL,
        "dimension": int(vector.size),
        "vector": vector.astype("<f4").tobytes(),
        "created_at": datetime.now(UTC),
    }
