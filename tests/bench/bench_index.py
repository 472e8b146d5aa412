"""Similarity index benchmark: query latency, recall and cost of each index kind, next to a
plain FAISS flat search in the same run.

Run on demand (not a timed test; CI runs it only at a tiny size, see
``test_bench_index_smoke.py``)::

    python -m tests.bench.bench_index --sizes 10000,100000,1000000 --dim 1024 \\
        [--queries 200] [--kinds flat,hnsw,ivfpq] [--metric cosine|l2] \\
        [--ef-search 64,128,256] [--nprobe 16,32,64] [--catalog-rows 10000]

On a machine whose cores are shared, export ``OMP_WAIT_POLICY=PASSIVE``: FAISS's OpenMP
threads otherwise spin while they wait, and a busy neighbour makes every parallel add or
train several times slower (measured here: an HNSW build 2.7 s passive, 7.8 s spinning).

How it is built:

* Data: clustered random vectors (:func:`clustered_vectors`), ~1000 per cluster, each
  cluster spread over its own 16-dimensional subspace, scaled so that the geometry is the
  same at every dimension. Plain Gaussian vectors would make every approximate index look
  useless (all distances alike); real embeddings have few effective dimensions. The
  queries are further points of the same clusters, not points of the index.
* Baseline, in the same run: a bare FAISS flat index (``IndexFlatIP`` on normalised
  vectors for cosine, ``IndexFlatL2`` for l2), searched one query at a time for k=10. It
  also gives the exact answers that recall is measured against.
* Each kind is a :class:`workers.index.VectorIndex` with the default
  :class:`~workers.index.IndexOptions` but the kind fixed, built with ``VectorIndex.build``
  (training included; the build time is train + add), searched one query at a time for
  k=10 through the index's own ``search`` (what the node calls). HNSW is measured at
  each ``--ef-search``, IVFPQ at each ``--nprobe`` on the same built index. Latency: p50
  and p99 of the wall time per query after 5 untimed queries; recall@10: the share of the
  exact 10 nearest found; memory: the serialised FAISS index plus the 8-byte id per
  vector, per vector.
* Search while adding: after the timed queries, a thread adds ``--adds`` more vectors
  to the index (in the index's own chunks, each under its exclusive lock) while this
  thread keeps searching; the table gives p99 and the maximum of those searches.
* Indexes are built one after the other and dropped before the next, so the largest
  size needs memory for the data, one index and the exact answers only.
* Catalog (once, at ``--catalog-rows`` rows of ``--dim``, a flat index so that the 100 new
  rows cannot trigger a change of kind): a SQLite catalog filled by bulk
  insert, ``SimilarityIndex.open`` rebuilding from it (rows/s), the snapshot save and a
  fresh open from that snapshot, the sync that brings 100 new rows (then searchable), and
  a sync with nothing new (what the node's ~0.5 s sync loop costs when idle).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

import faiss
import numpy as np
from sqlalchemy import insert

from node.catalog.models import EMBEDDINGS, INSTANCES, PATIENTS, SERIES, STUDIES
from node.catalog.recording import Catalog
from tests.bench.bench_find import quantile
from workers.index import IndexOptions, Metric, SimilarityIndex, Structure, VectorIndex

K = 10
WARM_UP = 5
MODEL_ID = "b" * 64
GOAL = "goal: p50 <= 5 ms at 1M vectors with recall@10 >= 0.95 (2 cores); ~1 ms at 2k"
_INSERT_BATCH = 2000


def clustered_vectors(
    n: int, dim: int, seed: int = 0, *, per_cluster: int = 1000, latent: int = 16, spread: float = 3.0
) -> np.ndarray:
    """``n`` float32 vectors of ``dim`` in clusters of ~``per_cluster``: a random centre
    plus a Gaussian in a random ``latent``-dimensional subspace of its own, plus a little
    isotropic noise. Centres are ~11 apart and clusters ~12 wide whatever ``dim``. The
    rows come in random cluster order, so any slice is a sample of the same clusters."""
    rng = np.random.default_rng(seed)
    clusters = max(4, n // per_cluster)
    rank = min(latent, dim)
    scale = np.float32(np.sqrt(64.0 / dim))
    out = np.empty((n, dim), dtype=np.float32)
    which = rng.integers(0, clusters, n)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(clusters + 1))
    for cluster in range(clusters):
        rows = order[bounds[cluster] : bounds[cluster + 1]]
        centre = rng.standard_normal(dim, dtype=np.float32) * scale
        basis = rng.standard_normal((rank, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        spread_rows = rng.standard_normal((rows.size, rank), dtype=np.float32) * np.float32(spread)
        out[rows] = centre + spread_rows @ basis
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        out[start:stop] += rng.standard_normal((stop - start, dim), dtype=np.float32) * (0.05 * scale)
    return out


# ------------------------------------------------------------------------------------------
# A catalog holding embeddings (also used by tests/workers/test_index.py)


def insert_instances(catalog: Catalog, count: int) -> np.ndarray:
    """``count`` new image instances in one new study; returns their pks in order."""
    now = datetime.now(UTC)
    tag = f"{time.monotonic_ns()}"
    with catalog.transaction() as connection:
        patient = connection.execute(
            insert(PATIENTS).returning(PATIENTS.c.id),
            [
                {
                    "patient_id": f"BENCH-{tag}",
                    "issuer_of_patient_id": "",
                    "patient_name": "BENCH^INDEX",
                    "patient_birth_date": "",
                    "patient_sex": "",
                    "created_at": now,
                }
            ],
        ).scalar_one()
        study = connection.execute(
            insert(STUDIES).returning(STUDIES.c.id),
            [
                {
                    "study_instance_uid": f"2.25.{tag}",
                    "patient_pk": patient,
                    "study_date": "20240101",
                    "study_time": "120000",
                    "accession_number": "",
                    "study_id": "1",
                    "study_description": "",
                    "referring_physician_name": "",
                    "created_at": now,
                    "updated_at": now,
                    "assessment_due": False,
                }
            ],
        ).scalar_one()
        series = connection.execute(
            insert(SERIES).returning(SERIES.c.id),
            [
                {
                    "series_instance_uid": f"2.25.{tag}.1",
                    "study_pk": study,
                    "modality": "US",
                    "series_number": 1,
                    "series_description": "",
                    "body_part_examined": "",
                    "laterality": "",
                    "created_at": now,
                }
            ],
        ).scalar_one()
        pks: list[int] = []
        for start in range(0, count, _INSERT_BATCH):
            rows = [
                _instance_row(series, f"2.25.{tag}.1.{i}", now)
                for i in range(start, min(count, start + _INSERT_BATCH))
            ]
            pks += (
                connection.execute(
                    insert(INSTANCES).returning(INSTANCES.c.id, sort_by_parameter_order=True), rows
                )
                .scalars()
                .all()
            )
    return np.asarray(pks, dtype=np.int64)


def _instance_row(series: int, uid: str, now: datetime) -> dict[str, Any]:
    return {
        "sop_instance_uid": uid,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.6.1",
        "series_pk": series,
        "instance_number": 1,
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "image_laterality": "",
        "view_position": "",
        "rows": 64,
        "columns": 64,
        "number_of_frames": None,
        "file_path": f"objects/bench/{uid}.dcm",
        "file_size": 1,
        "calling_ae_title": "BENCH",
        "received_at": now,
    }


def insert_embeddings(
    catalog: Catalog, model_id: str, instance_pks: Sequence[int] | np.ndarray, vectors: np.ndarray
) -> None:
    """Store embeddings as :meth:`AnalysisRecords.record` does (float32 little-endian bytes),
    in one transaction."""
    now = datetime.now(UTC)
    encoded = np.ascontiguousarray(vectors, dtype="<f4")
    with catalog.transaction() as connection:
        for start in range(0, len(encoded), _INSERT_BATCH):
            connection.execute(
                insert(EMBEDDINGS),
                [
                    {
                        "instance_pk": int(pk),
                        "model_id": model_id,
                        "dimension": int(vector.size),
                        "vector": vector.tobytes(),
                        "created_at": now,
                    }
                    for pk, vector in zip(
                        instance_pks[start : start + _INSERT_BATCH],
                        encoded[start : start + _INSERT_BATCH],
                        strict=True,
                    )
                ],
            )


# ------------------------------------------------------------------------------------------
# Measuring


@dataclass
class KindResult:
    """One index (or one search setting of it) at one size."""

    label: str
    build_seconds: float
    latencies: list[float]
    recall: float
    bytes_per_vector: float
    baseline_latencies: list[float] = field(default_factory=list)  # interleaved with ``latencies``
    during_add: list[float] = field(default_factory=list)
    adds_per_second: float = 0.0

    @property
    def p50(self) -> float:
        return quantile(self.latencies, 0.5)

    @property
    def ratio(self) -> float:
        """p50 over the p50 of the baseline's queries timed alternately with these."""
        if not self.baseline_latencies:
            return 1.0
        return self.p50 / quantile(self.baseline_latencies, 0.5)

    @property
    def p99(self) -> float:
        return quantile(self.latencies, 0.99)


@dataclass
class SizeResult:
    size: int
    dim: int
    metric: Metric
    baseline: KindResult
    kinds: list[KindResult]


@dataclass
class CatalogResult:
    rows: int
    dim: int
    fill_seconds: float
    rebuild_seconds: float
    save_seconds: float
    load_seconds: float
    sync_new_seconds: float
    new_searchable: bool
    idle_sync_seconds: float


@dataclass
class BenchResult:
    sizes: list[SizeResult]
    catalog: CatalogResult | None
    omp_threads: int

    def table(self) -> str:
        lines = [
            GOAL,
            f"FAISS {faiss.__version__}, OpenMP threads {self.omp_threads}, k={K}, one query at a time",
        ]
        for size in self.sizes:
            lines += _size_table(size)
        if self.catalog is not None:
            lines += _catalog_lines(self.catalog)
        return "\n".join(lines)


def _size_table(size: SizeResult) -> list[str]:
    lines = [
        "",
        f"{size.size} vectors, dim {size.dim}, metric {size.metric}, {len(size.baseline.latencies)} queries",
        f"{'index':<22} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50/base':>8} {'recall@10':>9} "
        f"{'B/vector':>9} {'add p99':>8} {'add max':>8} {'adds/s':>8}",
    ]
    for result in [size.baseline, *size.kinds]:
        during = (
            f"{quantile(result.during_add, 0.99) * 1e3:8.2f} {max(result.during_add) * 1e3:8.2f} "
            f"{result.adds_per_second:8.0f}"
            if result.during_add
            else f"{'-':>8} {'-':>8} {'-':>8}"
        )
        lines.append(
            f"{result.label:<22} {result.build_seconds:8.2f} {result.p50 * 1e3:8.3f} {result.p99 * 1e3:8.3f} "
            f"{result.ratio:8.3f} {result.recall:9.3f} "
            f"{result.bytes_per_vector:9.0f} {during}"
        )
    return lines


def _catalog_lines(result: CatalogResult) -> list[str]:
    r = result
    return [
        "",
        f"catalog (SQLite, {r.rows} embeddings of dim {r.dim}, flat, filled in {r.fill_seconds:.1f} s):",
        f"  rebuild from the catalog   {r.rebuild_seconds:8.2f} s  ({r.rows / r.rebuild_seconds:.0f} rows/s)",
        f"  save snapshot              {r.save_seconds:8.2f} s",
        f"  open from snapshot         {r.load_seconds:8.2f} s  "
        f"({r.rebuild_seconds / r.load_seconds:.1f}x faster than a rebuild)",
        f"  sync of 100 new rows       {r.sync_new_seconds * 1e3:8.1f} ms "
        f"(searchable after: {r.new_searchable})",
        f"  sync with nothing new      {r.idle_sync_seconds * 1e3:8.1f} ms",
    ]


def _serialised_bytes(faiss_index: Any) -> int:
    counted = [0]

    def count(data: bytes) -> int:
        counted[0] += len(data)
        return len(data)

    faiss.write_index(faiss_index, faiss.PyCallbackIOWriter(count))  # type: ignore[attr-defined]
    return counted[0]


Search = Callable[[np.ndarray], object]


def _baseline(data: np.ndarray, queries: np.ndarray, metric: Metric) -> tuple[KindResult, np.ndarray, Search]:
    """The bare FAISS flat index: its latency, the exact answers, and its one-query search."""
    started = time.perf_counter()
    if metric == "cosine":
        data, queries = _normalised(data), _normalised(queries)
        flat: Any = faiss.IndexFlatIP(data.shape[1])
    else:
        flat = faiss.IndexFlatL2(data.shape[1])
    flat.add(data)
    build = time.perf_counter() - started

    def search(query: np.ndarray) -> object:
        prepared = _normalised(query[None, :]) if metric == "cosine" else query[None, :]
        return flat.search(prepared, K)

    latencies, _ = _timed(search, queries)
    _, truth = flat.search(queries, K)
    bytes_per_vector = _serialised_bytes(flat) / data.shape[0]
    return KindResult("faiss flat (baseline)", build, latencies, 1.0, bytes_per_vector), truth, search


def _normalised(vectors: np.ndarray) -> np.ndarray:
    out = np.array(vectors, dtype=np.float32)
    faiss.normalize_L2(out)
    return out


def _timed(
    search: Search, queries: np.ndarray, baseline: Search | None = None
) -> tuple[list[float], list[float]]:
    """Wall time of ``search`` per query (after a few untimed ones) and, when given, of the
    baseline's search of the same query, the two alternating which goes first."""
    for query in queries[:WARM_UP]:
        search(query)
    latencies: list[float] = []
    base: list[float] = []
    for position, query in enumerate(queries):
        if baseline is not None and position % 2:
            base.append(_seconds(baseline, query))
        latencies.append(_seconds(search, query))
        if baseline is not None and not position % 2:
            base.append(_seconds(baseline, query))
    return latencies, base


def _seconds(search: Search, query: np.ndarray) -> float:
    started = time.perf_counter()
    search(query)
    return time.perf_counter() - started


def _variants(
    kind: Structure,
    options: IndexOptions,
    ef_search: Sequence[int],
    nprobe: Sequence[int],
    index: VectorIndex,
) -> list[tuple[str, IndexOptions]]:
    if kind == "hnsw":
        return [(f"hnsw M={options.hnsw_m} ef={ef}", replace(options, hnsw_ef_search=ef)) for ef in ef_search]
    if kind == "ivfpq":
        shape = f"{index.layout.nlist}x{index.layout.pq_m}"
        return [(f"ivfpq {shape} nprobe={n}", replace(options, nprobe=n)) for n in nprobe]
    return [("flat (VectorIndex)", options)]


def _measure_kind(
    kind: Structure,
    data: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    extra: np.ndarray,
    metric: Metric,
    ef_search: Sequence[int],
    nprobe: Sequence[int],
    baseline: Search,
) -> list[KindResult]:
    options = IndexOptions(kind=kind, metric=metric)
    started = time.perf_counter()
    index = VectorIndex.build(kind, metric, options, np.arange(data.shape[0]), data)
    build = time.perf_counter() - started
    with index.frozen() as (faiss_index, _):
        per_vector = _serialised_bytes(faiss_index) / data.shape[0] + 8
    print(f"  {kind} {index.layout}: built in {build:.1f} s", file=sys.stderr)
    results = []
    variants = _variants(kind, options, ef_search, nprobe, index)
    for name, variant in variants:
        index.set_search_options(variant)
        answers: list[list[int]] = []

        def search(query: np.ndarray, answers: list[list[int]] = answers) -> None:
            answers.append([m.instance_pk for m in index.search(query, K)[0]])

        latencies, base = _timed(search, queries, baseline)
        found = answers[WARM_UP:]
        recall = float(
            np.mean([len(set(a) & set(t.tolist())) / K for a, t in zip(found, truth, strict=True)])
        )
        results.append(KindResult(name, build, latencies, recall, per_vector, base))
    chosen = next((i for i, (_, v) in enumerate(variants) if v == options), len(variants) - 1)
    index.set_search_options(variants[chosen][1])
    during, rate = _search_while_adding(index, queries, extra, data.shape[0])
    results[chosen].during_add, results[chosen].adds_per_second = during, rate
    return results


def _search_while_adding(
    index: VectorIndex, queries: np.ndarray, extra: np.ndarray, first_pk: int
) -> tuple[list[float], float]:
    """Latencies of searches made while another thread adds ``extra``; and its adds/s."""
    done = threading.Event()
    seconds = [0.0]

    def add() -> None:
        started = time.perf_counter()
        index.add(np.arange(first_pk, first_pk + extra.shape[0]), extra)
        seconds[0] = time.perf_counter() - started
        done.set()

    adder = threading.Thread(target=add)
    latencies: list[float] = []
    adder.start()
    position = 0
    while not latencies or not done.is_set():  # one search at least, begun while adding
        started = time.perf_counter()
        index.search(queries[position % len(queries)], K)
        latencies.append(time.perf_counter() - started)
        position += 1
    adder.join()
    return latencies, extra.shape[0] / seconds[0] if seconds[0] else float("inf")


def measure_size(
    size: int,
    dim: int,
    queries: int,
    kinds: Sequence[Structure],
    metric: Metric,
    ef_search: Sequence[int],
    nprobe: Sequence[int],
    adds: int,
    seed: int,
) -> SizeResult:
    started = time.perf_counter()
    everything = clustered_vectors(size + queries + adds, dim, seed)
    data, query_vectors, extra = (
        everything[:size],
        everything[size : size + queries],
        everything[size + queries :],
    )
    print(f"{size} x {dim}: data made in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    baseline, truth, baseline_search = _baseline(data, query_vectors, metric)
    gc.collect()
    print(f"  baseline p50 {baseline.p50 * 1e3:.2f} ms", file=sys.stderr)
    results: list[KindResult] = []
    for kind in kinds:
        results += _measure_kind(
            kind, data, query_vectors, truth, extra, metric, ef_search, nprobe, baseline_search
        )
        gc.collect()
    return SizeResult(size, dim, metric, baseline, results)


def measure_catalog(rows: int, dim: int, metric: Metric, workdir: Path, seed: int) -> CatalogResult:
    """Rebuild, snapshot, reopen and sync against a real SQLite catalog."""
    url = f"sqlite:///{workdir / 'catalog.sqlite3'}"
    catalog = Catalog.open(url)
    try:
        vectors = clustered_vectors(rows + 100, dim, seed)
        started = time.perf_counter()
        pks = insert_instances(catalog, rows + 100)
        insert_embeddings(catalog, MODEL_ID, pks[:rows], vectors[:rows])
        fill = time.perf_counter() - started
        options = IndexOptions(kind="flat", metric=metric)  # no change of kind mid-measure
        snapshot = workdir / "index.snapshot"
        started = time.perf_counter()
        index = SimilarityIndex.open(catalog, MODEL_ID, options)
        rebuild = time.perf_counter() - started
        started = time.perf_counter()
        index.save(snapshot)
        save = time.perf_counter() - started
        started = time.perf_counter()
        reopened = SimilarityIndex.open(catalog, MODEL_ID, options, snapshot)
        load = time.perf_counter() - started
        insert_embeddings(catalog, MODEL_ID, pks[rows:], vectors[rows:])
        started = time.perf_counter()
        reopened.sync(catalog)
        sync_new = time.perf_counter() - started
        found = reopened.search(vectors[rows:], 1)
        searchable = all(
            answer and answer[0].instance_pk == pk
            for answer, pk in zip(found, pks[rows:].tolist(), strict=True)
        )
        started = time.perf_counter()
        reopened.sync(catalog)
        idle = time.perf_counter() - started
    finally:
        catalog.close()
    return CatalogResult(rows, dim, fill, rebuild, save, load, sync_new, searchable, idle)


def run_benchmark(
    sizes: Sequence[int],
    dim: int,
    queries: int = 200,
    kinds: Sequence[Structure] = ("flat", "hnsw", "ivfpq"),
    metric: Metric = "cosine",
    *,
    ef_search: Sequence[int] = (64, 128, 256),
    nprobe: Sequence[int] = (16, 32, 64),
    adds: int = 2000,
    catalog_rows: int = 10_000,
    seed: int = 0,
    workdir: Path | None = None,
    out: TextIO = sys.stdout,
) -> BenchResult:
    """Measure every kind at every size (and the catalog round trip unless
    ``catalog_rows`` is 0), print the table to ``out`` and return the figures."""
    results = [
        measure_size(size, dim, queries, kinds, metric, ef_search, nprobe, adds, seed) for size in sizes
    ]
    catalog = None
    if catalog_rows:
        with _directory(workdir) as root:
            catalog = measure_catalog(catalog_rows, dim, metric, root, seed)
    result = BenchResult(results, catalog, faiss.omp_get_max_threads())
    print(result.table(), file=out, flush=True)
    return result


@contextlib.contextmanager
def _directory(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="bench-index-") as temporary:
        yield Path(temporary)


def _integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=_integers, default=[10_000, 100_000], help="vectors per index, comma-separated"
    )
    parser.add_argument("--dim", type=int, default=1024, help="dimension (default 1024, DenseNet121's)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per index (default 200)")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq", help="index kinds, comma-separated")
    parser.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    parser.add_argument("--ef-search", type=_integers, default=[64, 128, 256], help="HNSW efSearch values")
    parser.add_argument("--nprobe", type=_integers, default=[16, 32, 64], help="IVF nprobe values")
    parser.add_argument("--adds", type=int, default=2000, help="vectors added while searching (default 2000)")
    parser.add_argument(
        "--catalog-rows", type=int, default=10_000, help="rows for the catalog round trip (0: skip)"
    )
    parser.add_argument("--workdir", type=Path, help="a directory for the catalog (default: temp)")
    args = parser.parse_args(argv)
    kinds = cast(list[Structure], [kind.strip() for kind in args.kinds.split(",") if kind.strip()])
    if not set(kinds) <= {"flat", "hnsw", "ivfpq"}:
        parser.error("--kinds takes flat, hnsw and ivfpq")
    if min(args.sizes, default=0) < 1 or args.dim < 1 or args.queries < 1 or args.adds < 1:
        parser.error("--sizes, --dim, --queries and --adds must be positive")
    run_benchmark(
        args.sizes,
        args.dim,
        args.queries,
        kinds,
        args.metric,
        ef_search=args.ef_search,
        nprobe=args.nprobe,
        adds=args.adds,
        catalog_rows=args.catalog_rows,
        workdir=args.workdir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
