"""The similarity index: FAISS over the embeddings of ONE model, a cache of the catalog.

The catalog's ``embeddings`` table is the truth (DESIGN.md); this index follows it by id
(:meth:`SimilarityIndex.sync`), can be rebuilt from it at any time
(:meth:`SimilarityIndex.rebuild`, ``precedent reindex``), and keeps a snapshot on disk only
so that a restart does not have to read every vector again. Deleting the snapshot loses
nothing.

Distances
    ``cosine`` (the default) compares L2-normalised vectors and reports
    ``1 - cosine similarity``: 0 for the same direction, 1 for orthogonal, 2 for opposite.
    ``l2`` reports the Euclidean distance (the square root of what FAISS computes). Smaller
    is always more similar. Exact search uses ``IndexFlatIP`` on the normalised vectors for
    cosine and ``IndexFlatL2`` for l2; the approximate kinds use L2 internally for both (on
    normalised vectors ``|a - b|² = 2 - 2 cos``, so the ranking is the same and HNSW graphs
    and k-means behave better on L2), and report the same distances.

Kinds
    ``flat`` is exact; ``hnsw`` (graph, no training, vectors kept) and ``ivfpq`` (inverted
    lists of product-quantised codes, trained on stored vectors, re-ranked exactly by
    default) are approximate; ``auto`` is flat up to ``flat_max_vectors`` and then
    ``large_kind``. An ``ivfpq`` index stays flat until there are enough vectors to train
    it. A change of structure (flat grown past the threshold, IVF lists trained on far fewer
    vectors than it now holds, many superseded rows) is made by a rebuild from the catalog
    during :meth:`SimilarityIndex.sync`; searches go on on the old index meanwhile.

Ids
    FAISS numbers rows in insertion order; the index maps them to instance pks. An
    instance has at most one embedding per model; when a new one arrives (the instance was
    replaced and analysed again) its old row is masked, not removed (HNSW cannot remove),
    and left out of every answer. Rows deleted from the catalog without a replacement stay
    until the next rebuild: callers resolve matches through the catalog, where they no
    longer join.

Concurrency
    Any number of searches run at once (FAISS releases the GIL); vectors are added in
    chunks of ~10 ms, each under an exclusive lock, so a search waits at most for one chunk
    (or, once per doubling of the index, for FAISS to reallocate its vector storage).
    One sync, rebuild or save runs at a time.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple, get_args

import faiss
import numpy as np
from numpy.typing import ArrayLike

from node.catalog.embeddings import EmbeddingRecords, StoredEmbeddings
from node.catalog.recording import Catalog

__all__ = [
    "DimensionMismatch",
    "IndexKind",
    "IndexOptions",
    "Keep",
    "Layout",
    "Match",
    "Metric",
    "Progress",
    "SimilarityIndex",
    "SimilarityIndexError",
    "SnapshotError",
    "Structure",
    "UnknownInstance",
    "UnknownModel",
    "VectorIndex",
    "auto_nlist",
    "auto_pq_m",
    "plan_layout",
    "snapshot_path",
    "training_size",
]

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "ivfpq", "hnsw"]
Structure = Literal["flat", "ivfpq", "hnsw"]
LargeKind = Literal["ivfpq", "hnsw"]
Metric = Literal["cosine", "l2"]

Progress = Callable[[int, int], None]
"""Called as ``progress(vectors_done, vectors_expected)`` while an index is built."""

Keep = Callable[[int], bool]
"""A filter on candidate instance pks: False drops the candidate from the answer. Called
while the index is held for reading (adds wait): keep it cheap, no catalog query."""

_Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class SimilarityIndexError(Exception):
    """The index cannot do what was asked; the message names the model and why."""


class DimensionMismatch(SimilarityIndexError, ValueError):
    """Vectors whose dimension is not the index's."""


class UnknownModel(SimilarityIndexError):
    """The catalog has neither registered the model nor stored an embedding of it."""


class UnknownInstance(SimilarityIndexError):
    """The instance has no embedding of this model (not analysed, or not yet)."""


class SnapshotError(SimilarityIndexError):
    """A snapshot file that cannot be used; the index is rebuilt from the catalog instead."""


@dataclass(frozen=True)
class IndexOptions:
    """How the index of one model is built and searched; invalid options cannot exist.

    ``ivf_nlist`` and ``pq_m`` of 0 are chosen from the data: about ``sqrt(n)`` lists (a
    power of two, at least 16) for the n vectors present at training, ``dimension / 16``
    sub-quantizers (16 dimensions each). IVF lists are trained once
    ``ivf_train_points_per_list * nlist`` vectors are stored, and trained again when the
    index has grown ``ivf_retrain_growth`` times past what they were trained on (only with
    an automatic ``ivf_nlist``). ``nprobe``, ``refine_factor``, ``hnsw_ef_search`` and
    ``sync_batch`` act at search or sync time: changing them keeps a snapshot usable.

    The defaults come from ``tests/bench/bench_index.py`` on this project's 2-core machine
    (clustered vectors, k=10): a flat search of 1024-d vectors costs ~0.7 ms per thousand
    vectors, so ``auto`` stays exact up to 10,000 (a few ms, and the paper's 2,000-image
    setting is exact); beyond, IVFPQ with exact re-ranking (nprobe 32, 8x candidates) found
    99.6 % of the exact 10 nearest at 1M vectors in 1.3-1.8 ms, built 4x faster and adds
    15x faster than HNSW (M=32), whose recall there was 0.78-0.89 at efSearch 64-256.
    """

    kind: IndexKind = "auto"
    metric: Metric = "cosine"
    flat_max_vectors: int = 10_000
    large_kind: LargeKind = "ivfpq"
    ivf_nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 8
    ivfpq_refine: bool = True
    ivf_train_points_per_list: int = 40
    ivf_retrain_growth: float = 8.0
    nprobe: int = 32
    refine_factor: int = 8
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 256
    sync_batch: int = 5_000

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, get_args(IndexKind))
        _check_choice("metric", self.metric, get_args(Metric))
        _check_choice("large_kind", self.large_kind, get_args(LargeKind))
        for name in _POSITIVE_OPTIONS:
            _check_at_least(name, getattr(self, name), 1)
        for name in ("flat_max_vectors", "ivf_nlist", "pq_m"):
            _check_at_least(name, getattr(self, name), 0)
        if self.pq_bits not in (4, 5, 6, 7, 8):
            raise ValueError(f"index option pq_bits must be 4 to 8, not {self.pq_bits}")
        if self.ivf_retrain_growth < 1.5:
            raise ValueError(
                f"index option ivf_retrain_growth must be at least 1.5, not {self.ivf_retrain_growth}"
            )

    def structure(self) -> dict[str, Any]:
        """The options that shape a stored index: a snapshot is used only when these match."""
        return {k: v for k, v in asdict(self).items() if k not in _SEARCH_TIME_OPTIONS}


_POSITIVE_OPTIONS = (
    "nprobe",
    "refine_factor",
    "hnsw_m",
    "hnsw_ef_construction",
    "hnsw_ef_search",
    "sync_batch",
    "ivf_train_points_per_list",
)
_SEARCH_TIME_OPTIONS = frozenset({"nprobe", "refine_factor", "hnsw_ef_search", "sync_batch"})


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"index option {name} must be one of {', '.join(allowed)}, not {value!r}")


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"index option {name} must be an integer of at least {minimum}, not {value!r}")


class Match(NamedTuple):
    """One answer: the instance and its distance to the query (smaller is more similar)."""

    instance_pk: int
    distance: float


# Vectors are added in chunks sized to hold the exclusive lock ~10 ms: a search waits at
# most for one chunk. The first chunk's size is a guess (an HNSW insert costs ~0.1-0.7 ms at
# 1024-d, a flat one a copy); each chunk's own time sizes the next.
_LOCK_HOLD_SECONDS = 0.01
_FIRST_CHUNK: dict[Structure, int] = {"flat": 1024, "ivfpq": 128, "hnsw": 16}
_CHUNK_LIMITS = (4, 65536)


class _SharedLock:
    """Many readers (searches) at once, or one writer (an add), taking turns fairly: a
    waiting writer holds back new readers (a stream of searches cannot starve the sync),
    and readers that waited for a writer go before its next chunk (a long add cannot
    starve the searches)."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._readers_waiting = 0
        self._readers_turn = False
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._readers_waiting += 1
            self._condition.wait_for(
                lambda: not self._writing and (self._readers_turn or not self._writers_waiting)
            )
            self._readers_waiting -= 1
            if not self._readers_waiting:
                self._readers_turn = False
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(
                lambda: not self._writing and not self._readers and not self._readers_turn
            )
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._readers_turn = self._readers_waiting > 0
                self._condition.notify_all()


@dataclass(frozen=True)
class Layout:
    """The concrete FAISS structure of one index, recorded in its snapshot."""

    kind: Structure
    metric: Metric
    dimension: int
    nlist: int = 0
    pq_m: int = 0
    trained_on: int = 0

    @property
    def exact_ip(self) -> bool:
        """Only flat cosine searches by inner product; every other layout by L2."""
        return self.kind == "flat" and self.metric == "cosine"


class VectorIndex:
    """A FAISS index whose rows are instance pks: safe to search while vectors are added.

    Built empty (:meth:`create`) or from arrays (:meth:`build`); vectors are validated,
    normalised for cosine, and added in chunks. Knows nothing of the catalog.
    """

    def __init__(self, layout: Layout, options: IndexOptions, faiss_index: Any, labels: np.ndarray) -> None:
        if faiss_index.ntotal != labels.size:
            raise SimilarityIndexError(f"index holds {faiss_index.ntotal} rows but {labels.size} ids")
        self.layout = layout
        self.options = options
        self._index = faiss_index
        self._lock = _SharedLock()
        self._labels = np.array(labels, dtype=np.int64)
        self._size = int(labels.size)
        self._chunk = _FIRST_CHUNK[layout.kind]
        self._row_of: dict[int, int] = {}
        for row, pk in enumerate(self._labels.tolist()):
            if pk >= 0:
                self._row_of[pk] = row
        self._apply_search_options()

    @classmethod
    def create(cls, layout: Layout, options: IndexOptions) -> VectorIndex:
        """An empty index of ``layout`` (untrained for ``ivfpq``: :meth:`train` comes first)."""
        return cls(layout, options, _new_faiss_index(layout, options), np.zeros(0, np.int64))

    @classmethod
    def build(
        cls,
        kind: Structure,
        metric: Metric,
        options: IndexOptions,
        instance_pks: ArrayLike,
        vectors: ArrayLike,
    ) -> VectorIndex:
        """An index of ``kind`` holding ``vectors`` (trained on them where needed)."""
        array = _as_matrix(vectors)
        layout = plan_layout(kind, metric, options, array.shape[1], array.shape[0])
        built = cls.create(layout, options)
        if built.needs_training:
            built.train(array)
        built.add(np.asarray(instance_pks, dtype=np.int64), array)
        return built

    # ----------------------------------------------------------------------------------
    # Size and contents

    def __len__(self) -> int:
        """Searchable vectors: rows not superseded by a newer embedding of their instance."""
        return len(self._row_of)

    @property
    def rows(self) -> int:
        return self._size

    @property
    def superseded(self) -> int:
        return self._size - len(self._row_of)

    @property
    def dimension(self) -> int:
        return self.layout.dimension

    @property
    def needs_training(self) -> bool:
        return not self._index.is_trained

    def __contains__(self, instance_pk: object) -> bool:
        return instance_pk in self._row_of

    def vector_of(self, instance_pk: int) -> np.ndarray | None:
        """The stored vector of an instance (normalised for cosine), or None when the
        index does not hold it or keeps only compressed codes (plain IVFPQ)."""
        if self.layout.kind == "ivfpq" and not self.options.ivfpq_refine:
            return None
        with self._lock.shared():
            row = self._row_of.get(instance_pk)
            if row is None:
                return None
            return np.asarray(self._index.reconstruct(row), dtype=np.float32)

    # ----------------------------------------------------------------------------------
    # Adding

    def train(self, vectors: ArrayLike) -> None:
        """Train IVF lists and PQ codebooks on ``vectors``; only before the first add."""
        array = self._prepared(_as_matrix(vectors))
        if self._size:
            raise SimilarityIndexError("an index is trained before vectors are added, not after")
        started = time.perf_counter()
        self._index.train(array)
        log.info(
            "trained %s lists=%d on %d vectors in %.1f s",
            self.layout.kind,
            self.layout.nlist,
            array.shape[0],
            time.perf_counter() - started,
        )

    def add(self, instance_pks: ArrayLike, vectors: ArrayLike) -> int:
        """Add vectors of the given instances; an instance already present is superseded
        (its old row masked). Rows with a NaN or infinite value are skipped with a warning.
        Returns how many vectors were added."""
        pks = np.asarray(instance_pks, dtype=np.int64).reshape(-1)
        array = _as_matrix(vectors)
        if array.shape[0] != pks.size:
            raise ValueError(f"{pks.size} instance pks for {array.shape[0]} vectors")
        if self.needs_training:
            raise SimilarityIndexError(
                f"the {self.layout.kind} index must be trained before vectors are added"
            )
        array, pks = self._finite(array, pks)
        array = self._prepared(array)
        start = 0
        while start < pks.size:
            stop = start + self._chunk
            self._add_chunk(pks[start:stop], array[start:stop])
            start = stop
        return int(pks.size)

    def _add_chunk(self, pks: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock.exclusive():
            started = time.perf_counter()
            self._index.add(vectors)
            first = self._size
            self._ensure_label_capacity(first + pks.size)
            self._labels[first : first + pks.size] = pks
            self._size += pks.size
            for offset, pk in enumerate(pks.tolist()):
                previous = self._row_of.get(pk)
                if previous is not None:
                    self._labels[previous] = -1
                self._row_of[pk] = first + offset
            per_vector = (time.perf_counter() - started) / max(1, pks.size)
        low, high = _CHUNK_LIMITS
        self._chunk = int(min(high, max(low, _LOCK_HOLD_SECONDS / max(per_vector, 1e-9))))

    def _ensure_label_capacity(self, needed: int) -> None:
        if needed > self._labels.size:
            grown = np.full(max(needed, 2 * self._labels.size, 1024), -1, dtype=np.int64)
            grown[: self._size] = self._labels[: self._size]
            self._labels = grown

    def _finite(self, vectors: np.ndarray, pks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        finite = np.isfinite(vectors).all(axis=1)
        if finite.all():
            return vectors, pks
        log.warning(
            "skipped %d embeddings with NaN or infinite values (instances %s)",
            int((~finite).sum()),
            pks[~finite][:10].tolist(),
        )
        return vectors[finite], pks[finite]

    def _prepared(self, vectors: np.ndarray) -> np.ndarray:
        """Check the dimension; normalise for cosine (zero vectors stay zero)."""
        if vectors.shape[1] != self.dimension:
            raise DimensionMismatch(
                f"vectors have {vectors.shape[1]} dimensions, the index holds {self.dimension}"
            )
        if self.layout.metric != "cosine":
            return np.ascontiguousarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1), dtype=np.float32)

    # ----------------------------------------------------------------------------------
    # Searching

    def search(
        self, queries: ArrayLike, k: int, *, exclude: Collection[int] = (), keep: Keep | None = None
    ) -> list[list[Match]]:
        """The ``k`` nearest instances to each query, nearest first, leaving out
        ``exclude``, superseded rows and candidates ``keep`` refuses; fetches more from
        FAISS until ``k`` remain or the index has no more to give."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}")
        array = _as_matrix(queries)
        if not np.isfinite(array).all():
            raise ValueError("query vectors contain NaN or infinite values")
        prepared = self._prepared(array)
        excluded = frozenset(int(pk) for pk in exclude)
        answers: list[list[Match]] = [[] for _ in range(prepared.shape[0])]
        with self._lock.shared():
            if not self._row_of:
                return answers
            search, exhaustive = self._index.search, self.layout.kind == "flat"
            fetch = min(self._size, k + len(excluded) + min(self.superseded, k))
            pending = list(range(prepared.shape[0]))
            while pending:
                distances, rows = search(prepared[pending], fetch)
                still, ran_dry = [], False
                for position, query in enumerate(pending):
                    answers[query] = self._matches(distances[position], rows[position], excluded, keep, k)
                    gave_all = bool((rows[position] >= 0).all())
                    if len(answers[query]) < k and not (gave_all and fetch >= self._size):
                        still.append(query)
                        ran_dry |= not gave_all
                pending = still
                if ran_dry and not exhaustive:
                    search, exhaustive = self._exhaustive(), True
                else:
                    fetch = min(self._size, fetch * 4)
        return answers

    def _exhaustive(self) -> _Search:
        """A search over every stored vector, for a query whose filters leave fewer than k
        of what the approximate structure can reach (an HNSW graph may not link distant
        clusters; IVF looks in ``nprobe`` lists only): exact on the kept vectors, or all
        IVF lists of a plain IVFPQ. As costly as a flat search, and only then."""
        if self.layout.kind == "hnsw":
            storage: _Search = faiss.downcast_index(self._index.storage).search
            return storage
        if self.layout.kind == "ivfpq" and self.options.ivfpq_refine:
            refine: _Search = faiss.downcast_index(self._index.refine_index).search
            return refine
        if self.layout.kind == "ivfpq":
            ivf = faiss.extract_index_ivf(self._index)
            every_list = faiss.SearchParametersIVF()
            every_list.nprobe = ivf.nlist
            return lambda vectors, k: ivf.search(vectors, k, params=every_list)
        flat: _Search = self._index.search
        return flat

    def search_arrays(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's answer as arrays ``(instance_pks, distances)``, ``(queries, k)`` each, with
        nothing excluded and pk -1 for superseded rows and missing results: for
        evaluations and benchmarks that need whole rankings fast."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}")
        prepared = self._prepared(_as_matrix(queries))
        with self._lock.shared():
            if not self._size:
                empty = np.full((prepared.shape[0], k), -1, dtype=np.int64)
                return empty, np.full(empty.shape, np.inf, dtype=np.float32)
            distances, rows = self._index.search(prepared, k)
            pks = np.where(rows >= 0, self._labels[np.maximum(rows, 0)], -1)
        return pks, np.where(pks >= 0, self._distances(distances), np.inf).astype(np.float32)

    def _matches(
        self, distances: np.ndarray, rows: np.ndarray, excluded: frozenset[int], keep: Keep | None, k: int
    ) -> list[Match]:
        found: list[Match] = []
        pks = self._labels[np.maximum(rows, 0)]
        for distance, row, pk in zip(
            self._distances(distances).tolist(), rows.tolist(), pks.tolist(), strict=True
        ):
            if row < 0 or pk < 0 or pk in excluded or (keep is not None and not keep(pk)):
                continue
            found.append(Match(pk, distance))
            if len(found) == k:
                break
        return found

    def _distances(self, raw: np.ndarray) -> np.ndarray:
        """FAISS's scores as this module reports them (see the module's docstring)."""
        converted: np.ndarray
        if self.layout.metric == "l2":
            converted = np.sqrt(np.maximum(raw, 0))
        elif self.layout.exact_ip:
            converted = np.maximum(1.0 - raw, 0)
        else:
            converted = np.maximum(raw / 2.0, 0)
        return converted

    def set_search_options(self, options: IndexOptions) -> None:
        """Take the search-time parameters of ``options`` (nprobe, efSearch, refine
        factor); the structure they describe must be this index's."""
        if options.structure() != self.options.structure():
            raise SimilarityIndexError("only search-time options can change on a built index")
        with self._lock.exclusive():
            self.options = options
            self._apply_search_options()

    def _apply_search_options(self) -> None:
        """Set the search-time parameters on the FAISS objects (not part of a snapshot)."""
        if self.layout.kind == "hnsw":
            self._index.hnsw.efSearch = self.options.hnsw_ef_search
        elif self.layout.kind == "ivfpq":
            faiss.extract_index_ivf(self._index).nprobe = self.options.nprobe
            if self.options.ivfpq_refine:
                self._index.k_factor = float(self.options.refine_factor)

    # ----------------------------------------------------------------------------------
    # Snapshot contents

    @contextmanager
    def frozen(self) -> Iterator[tuple[Any, np.ndarray]]:
        """The FAISS index and its ids, held still (adds wait, searches go on)."""
        with self._lock.shared():
            yield self._index, self._labels[: self._size].copy()


def plan_layout(
    kind: Structure, metric: Metric, options: IndexOptions, dimension: int, vectors: int
) -> Layout:
    """The concrete structure for ``vectors`` vectors of ``dimension``: for ivfpq the number
    of lists and sub-quantizers (chosen from the data when the options say 0)."""
    if dimension < 1:
        raise DimensionMismatch(f"vectors must have at least one dimension, not {dimension}")
    if kind != "ivfpq":
        return Layout(kind, metric, dimension)
    nlist = options.ivf_nlist or auto_nlist(vectors)
    pq_m = options.pq_m or auto_pq_m(dimension)
    if dimension % pq_m:
        raise DimensionMismatch(f"index option pq_m = {pq_m} does not divide the dimension {dimension}")
    return Layout(kind, metric, dimension, nlist, pq_m, vectors)


def auto_nlist(vectors: int) -> int:
    """About sqrt(n) inverted lists, a power of two, 16 to 65536."""
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, math.sqrt(vectors)))))))


def auto_pq_m(dimension: int) -> int:
    """Sub-quantizers of about 16 dimensions: the largest divisor of ``dimension`` at most
    ``dimension / 16`` (1 for tiny dimensions)."""
    target = max(1, dimension // 16)
    return next(m for m in range(target, 0, -1) if dimension % m == 0)


def training_size(options: IndexOptions, nlist: int) -> int:
    """Vectors needed (and used) to train ``nlist`` lists and the PQ codebooks: FAISS's
    k-means wants at least 39 points per centroid (``2 ** pq_bits`` of them per codebook)."""
    return max(39 << options.pq_bits, options.ivf_train_points_per_list * nlist)


def _new_faiss_index(layout: Layout, options: IndexOptions) -> Any:
    d = layout.dimension
    if layout.kind == "flat":
        return faiss.IndexFlatIP(d) if layout.exact_ip else faiss.IndexFlatL2(d)
    if layout.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_L2)
        hnsw.hnsw.efConstruction = options.hnsw_ef_construction
        return hnsw
    quantizer = faiss.IndexFlatL2(d)
    ivfpq = faiss.IndexIVFPQ(quantizer, d, layout.nlist, layout.pq_m, options.pq_bits, faiss.METRIC_L2)
    return faiss.IndexRefineFlat(ivfpq) if options.ivfpq_refine else ivfpq


def _as_matrix(vectors: ArrayLike) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise ValueError(f"vectors must be one vector or a 2-D array, not an array of shape {array.shape}")
    return array


# --------------------------------------------------------------------------------------
# Following the catalog


# Ids below the high-water mark not yet seen (a transaction that committed after a later
# one, on PostgreSQL) are asked for again at each sync, for this long...
_GAP_SECONDS = 600.0
# ...and only among the most recent ids of the table: older ones belong to rows deleted
# long ago, not to transactions still in flight.
_GAP_WINDOW = 10_000


@dataclass
class _Gaps:
    """Ids below the high-water mark that were missing when the sync walked past them."""

    first_missed: dict[int, float] = field(default_factory=dict)

    def note(self, low: int, seen: np.ndarray, last_id_of_table: int) -> None:
        """Record the ids in (``low``, ``seen[-1]``] missing from ``seen`` (any model's ids)."""
        start = max(low + 1, last_id_of_table - _GAP_WINDOW + 1)
        end = int(seen[-1])
        if start > end:
            return
        missing = np.setdiff1d(np.arange(start, end + 1, dtype=np.int64), seen, assume_unique=True)
        now = time.monotonic()
        for gap in missing.tolist():
            self.first_missed.setdefault(gap, now)
        self._bound()

    def open_ids(self) -> list[int]:
        cutoff = time.monotonic() - _GAP_SECONDS
        for gap in [g for g, t in self.first_missed.items() if t < cutoff]:
            del self.first_missed[gap]
        return sorted(self.first_missed)

    def filled(self, ids: np.ndarray) -> None:
        for gap in ids.tolist():
            self.first_missed.pop(gap, None)

    def _bound(self) -> None:
        if len(self.first_missed) > _GAP_WINDOW:
            for gap in sorted(self.first_missed)[: len(self.first_missed) - _GAP_WINDOW]:
                del self.first_missed[gap]


@dataclass
class _Loader:
    """Feeds batches read from the catalog into a new index, training it first when its
    structure needs training (the first vectors, in id order, are the training set)."""

    model_id: str
    kind: Structure
    metric: Metric
    options: IndexOptions
    expected: int
    index: VectorIndex | None = None
    waiting: list[StoredEmbeddings] = field(default_factory=list)

    def feed(self, rows: StoredEmbeddings) -> int:
        if not len(rows):
            return 0
        if self.index is None:
            layout = plan_layout(self.kind, self.metric, self.options, rows.dimension, self.expected)
            self.index = VectorIndex.create(layout, self.options)
        if rows.dimension != self.index.dimension:
            raise DimensionMismatch(
                f"embedding {int(rows.ids[0])} of model {self.model_id} has {rows.dimension} dimensions, "
                f"the model's earlier embeddings {self.index.dimension}"
            )
        if not self.index.needs_training:
            return self.index.add(rows.instance_pks, rows.vectors)
        self.waiting.append(rows)
        if sum(len(w) for w in self.waiting) >= training_size(self.options, self.index.layout.nlist):
            return self._train_and_add()
        return 0

    def finish(self) -> VectorIndex | None:
        """The index; an IVF index that got too few vectors to train becomes flat."""
        if self.waiting:
            assert self.index is not None
            if sum(len(w) for w in self.waiting) < training_size(self.options, self.index.layout.nlist):
                log.info("too few vectors to train IVF lists yet: the index stays flat")
                self.index = VectorIndex.create(
                    plan_layout("flat", self.metric, self.options, self.index.dimension, 0), self.options
                )
            self._train_and_add()
        return self.index

    def _train_and_add(self) -> int:
        assert self.index is not None
        pks = np.concatenate([w.instance_pks for w in self.waiting])
        vectors = np.concatenate([w.vectors for w in self.waiting])
        self.waiting = []
        if self.index.needs_training:
            self.index.train(vectors)
        return self.index.add(pks, vectors)


class SimilarityIndex:
    """The similarity index of one model: searched by the similarity service, kept in step
    with the catalog by :meth:`sync`, saved with :meth:`save`.

    Start it with :meth:`open` (snapshot if usable, else a rebuild; then a sync). Every
    method may be called from any thread; searches never wait for a sync beyond one chunk
    of vectors being added.
    """

    def __init__(
        self, model_id: str, options: IndexOptions | None = None, snapshot: Path | None = None
    ) -> None:
        if not model_id:
            raise ValueError("a similarity index needs a model id")
        self.model_id = model_id
        self.options = options or IndexOptions()
        self.snapshot = snapshot
        self._vectors: VectorIndex | None = None
        self._high_water = 0
        self._gaps = _Gaps()
        self._maintenance = threading.Lock()
        self._unsaved = 0

    @classmethod
    def open(
        cls,
        catalog: Catalog,
        model_id: str,
        options: IndexOptions | None = None,
        snapshot: Path | None = None,
        progress: Progress | None = None,
    ) -> SimilarityIndex:
        """The index of ``model_id``, ready to search: loaded from ``snapshot`` when it was
        made for this model with these options (then synced), else rebuilt from the
        catalog (and saved)."""
        index = cls(model_id, options, snapshot)
        if index.load():
            index.sync(catalog)
        else:
            index._rebuild(catalog, progress)
        return index

    # ----------------------------------------------------------------------------------
    # State

    def __len__(self) -> int:
        """Searchable vectors."""
        vectors = self._vectors
        return 0 if vectors is None else len(vectors)

    @property
    def kind(self) -> Structure | None:
        """The structure in use now (None before the first vector)."""
        vectors = self._vectors
        return None if vectors is None else vectors.layout.kind

    @property
    def dimension(self) -> int | None:
        vectors = self._vectors
        return None if vectors is None else vectors.dimension

    @property
    def high_water(self) -> int:
        """The highest embedding id (of any model) the index has walked past."""
        return self._high_water

    @property
    def unsaved(self) -> int:
        """Vectors added since the snapshot was last written (or loaded)."""
        return self._unsaved

    # ----------------------------------------------------------------------------------
    # Following the catalog

    def sync(self, catalog: Catalog) -> int:
        """Add the embeddings committed since the last sync; returns how many were added.

        Cheap when nothing is new (two short reads); meant to be called every half second
        or so. Restructures the index by a rebuild from the catalog when it has outgrown
        its kind (see the module's docstring).
        """
        with self._maintenance:
            records = EmbeddingRecords(catalog)
            added = self._add_rows(records.by_ids(self.model_id, self._gaps.open_ids()))
            last_id_of_table = records.last_id()
            while True:
                walk = records.after(self.model_id, self._high_water, self.options.sync_batch)
                if walk.last_id is None:
                    break
                self._gaps.note(self._high_water, walk.seen, last_id_of_table)
                self._high_water = walk.last_id
                added += self._add_rows(walk.rows)
                if walk.seen.size < self.options.sync_batch:
                    break
            self._unsaved += added
            wanted = self._restructure_reason()
            if wanted is not None:
                log.info("similarity index of model %s: %s; rebuilding", self.model_id[:12], wanted)
                self._rebuild_locked(catalog, None)
        return added

    def _add_rows(self, rows: StoredEmbeddings) -> int:
        if not len(rows):
            return 0
        self._gaps.filled(rows.ids)
        if self._vectors is None:
            kind = self._kind_for(len(rows))
            layout = plan_layout(kind, self.options.metric, self.options, rows.dimension, len(rows))
            if layout.kind == "ivfpq":  # first vectors: too few to train, flat for now
                layout = plan_layout("flat", self.options.metric, self.options, rows.dimension, 0)
            self._vectors = VectorIndex.create(layout, self.options)
        if rows.dimension != self._vectors.dimension:
            raise DimensionMismatch(
                f"embedding {int(rows.ids[0])} of model {self.model_id} has {rows.dimension} dimensions, "
                f"the model's index {self._vectors.dimension}"
            )
        return self._vectors.add(rows.instance_pks, rows.vectors)

    def _kind_for(self, vectors: int) -> Structure:
        """The kind the options ask for at this size (ivfpq: once it can be trained)."""
        kind = self.options.kind
        if kind == "auto":
            kind = "flat" if vectors <= self.options.flat_max_vectors else self.options.large_kind
        if kind == "ivfpq":
            nlist = self.options.ivf_nlist or auto_nlist(vectors)
            if vectors < training_size(self.options, nlist):
                return "flat"
        return kind

    def _restructure_reason(self) -> str | None:
        """Why the index should be rebuilt now, or None."""
        vectors = self._vectors
        if vectors is None:
            return None
        wanted, current = self._kind_for(len(vectors)), vectors.layout.kind
        if current == "flat" and wanted != "flat":
            return f"{len(vectors)} vectors, {wanted} from now on"
        grown = len(vectors) / max(1, vectors.layout.trained_on)
        if current == "ivfpq" and not self.options.ivf_nlist and grown >= self.options.ivf_retrain_growth:
            return f"IVF lists trained on {vectors.layout.trained_on} vectors, now {len(vectors)}"
        if vectors.superseded > max(1000, vectors.rows // 4):
            return f"{vectors.superseded} of {vectors.rows} rows superseded by newer embeddings"
        return None

    def rebuild(self, catalog: Catalog, progress: Progress | None = None) -> int:
        """Build the index anew from the catalog (``precedent reindex``) and save it; the old
        index answers searches until the new one is complete. Returns the vectors indexed.

        Raises :class:`UnknownModel` when the catalog has never heard of the model.
        """
        if not EmbeddingRecords(catalog).is_known_model(self.model_id):
            raise UnknownModel(
                f"model {self.model_id} is neither registered nor has embeddings in the catalog"
            )
        return self._rebuild(catalog, progress)

    def _rebuild(self, catalog: Catalog, progress: Progress | None) -> int:
        with self._maintenance:
            return self._rebuild_locked(catalog, progress)

    def _rebuild_locked(self, catalog: Catalog, progress: Progress | None) -> int:
        started = time.perf_counter()
        records = EmbeddingRecords(catalog)
        expected = records.count(self.model_id)
        loader = _Loader(self.model_id, self._kind_for(expected), self.options.metric, self.options, expected)
        gaps, high_water, done = _Gaps(), 0, 0
        last_id_of_table = records.last_id()
        while True:
            walk = records.after(self.model_id, high_water, self.options.sync_batch)
            if walk.last_id is None:
                break
            gaps.note(high_water, walk.seen, last_id_of_table)
            high_water = walk.last_id
            loader.feed(walk.rows)
            done += len(walk.rows)
            if progress is not None:
                progress(done, max(done, expected))
        self._vectors, self._high_water, self._gaps = loader.finish(), high_water, gaps
        log.info(
            "similarity index of model %s rebuilt: %d vectors (%s) in %.1f s",
            self.model_id[:12],
            len(self),
            self.kind,
            time.perf_counter() - started,
        )
        self._unsaved = len(self)
        if self.snapshot is not None:
            self._save_locked(self.snapshot)
        return len(self)

    # ----------------------------------------------------------------------------------
    # Searching

    def search(
        self, vectors: ArrayLike, k: int, *, exclude: Collection[int] = (), keep: Keep | None = None
    ) -> list[list[Match]]:
        """For each query vector, up to ``k`` instances, nearest first, none of them in
        ``exclude`` (e.g. the query study's own images) nor refused by ``keep``. An empty
        index answers empty lists; a query of the wrong dimension raises
        :class:`DimensionMismatch`."""
        current = self._vectors
        if current is None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k must be a positive integer, not {k!r}")
            return [[] for _ in range(_as_matrix(vectors).shape[0])]
        try:
            return current.search(vectors, k, exclude=exclude, keep=keep)
        except DimensionMismatch as exc:
            raise DimensionMismatch(f"similarity index of model {self.model_id}: {exc}") from exc

    def search_instance(
        self,
        instance_pk: int,
        k: int,
        *,
        exclude: Collection[int] = (),
        keep: Keep | None = None,
        catalog: Catalog | None = None,
    ) -> list[Match]:
        """The ``k`` instances nearest to a stored one (never itself), with its vector as
        the index holds it or, not indexed yet, as ``catalog`` stores it. Raises
        :class:`UnknownInstance` when neither has it."""
        vector = self._stored_vector(instance_pk, catalog)
        return self.search(vector, k, exclude={instance_pk, *exclude}, keep=keep)[0]

    def _stored_vector(self, instance_pk: int, catalog: Catalog | None) -> np.ndarray:
        current = self._vectors
        vector = None if current is None else current.vector_of(instance_pk)
        if vector is not None:
            return vector
        if catalog is not None:
            stored = EmbeddingRecords(catalog).of_instances(self.model_id, [instance_pk])
            if len(stored):
                return np.asarray(stored.vectors[0], dtype=np.float32)
        raise UnknownInstance(f"instance {instance_pk} has no embedding of model {self.model_id}")

    # ----------------------------------------------------------------------------------
    # Snapshot

    def save(self, path: Path | None = None) -> Path:
        """Write the snapshot atomically (temporary file, fsync, rename) to ``path`` or the
        configured one. Searches go on meanwhile; a sync waits for it."""
        target = path or self.snapshot
        if target is None:
            raise SimilarityIndexError(f"no snapshot path configured for model {self.model_id}")
        with self._maintenance:
            self._save_locked(target)
        return target

    def _save_locked(self, path: Path) -> None:
        started = time.perf_counter()
        header: dict[str, Any] = {
            "format": _SNAPSHOT_FORMAT,
            "version": _SNAPSHOT_VERSION,
            "model_id": self.model_id,
            "options": self.options.structure(),
            "high_water": self._high_water,
            "gaps": sorted(self._gaps.first_missed),
            "layout": None,
            "rows": 0,
        }
        vectors = self._vectors
        if vectors is None:
            _write_snapshot(path, header, np.zeros(0, np.int64), None)
        else:
            with vectors.frozen() as (faiss_index, labels):
                header["layout"] = asdict(vectors.layout)
                header["rows"] = int(labels.size)
                _write_snapshot(path, header, labels, faiss_index)
        self._unsaved = 0
        log.info(
            "similarity index of model %s saved to %s (%d rows) in %.1f s",
            self.model_id[:12],
            path,
            header["rows"],
            time.perf_counter() - started,
        )

    def load(self, path: Path | None = None) -> bool:
        """Replace the index by the snapshot at ``path`` (or the configured one) when it was
        made for this model with these options. Returns False, with a warning for a
        snapshot that exists but cannot be used, otherwise."""
        source = path or self.snapshot
        if source is None or not source.exists():
            return False
        try:
            loaded = _read_snapshot(source, self.model_id, self.options)
        except SnapshotError as exc:
            log.warning("similarity index snapshot %s not used: %s; rebuilding from the catalog", source, exc)
            return False
        with self._maintenance:
            self._vectors, self._high_water = loaded.vectors, loaded.high_water
            self._gaps = _Gaps(dict.fromkeys(loaded.gaps, time.monotonic()))
            self._unsaved = 0
        log.info(
            "similarity index of model %s loaded from %s: %d vectors", self.model_id[:12], source, len(self)
        )
        return True


_MODEL_ID = re.compile(r"[0-9a-f]{1,64}")


def snapshot_path(directory: Path, model_id: str) -> Path:
    """Where the snapshot of ``model_id``'s index lives in ``directory`` (one per model)."""
    if not _MODEL_ID.fullmatch(model_id):
        raise ValueError(f"model id {model_id!r} is not a hexadecimal digest")
    return directory / f"similarity-{model_id}.faiss"


# --------------------------------------------------------------------------------------
# Snapshot files: magic, header length, JSON header, ids (int64 LE), FAISS index, CRC-32 of
# everything before it. The checksum is verified before FAISS parses a byte.

_SNAPSHOT_FORMAT = "precedent-similarity-index"
_SNAPSHOT_VERSION = 1
_MAGIC = b"PRECEDENT-INDEX\x00"
_MAX_HEADER = 64 * 1024 * 1024
_CHUNK = 16 * 1024 * 1024


class _ChecksummingWriter:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.crc = 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.file.write(data)


def _write_snapshot(path: Path, header: dict[str, Any], labels: np.ndarray, faiss_index: Any | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with temporary.open("wb") as file:
            out = _ChecksummingWriter(file)
            encoded = json.dumps(header, sort_keys=True).encode()
            out.write(_MAGIC + struct.pack("<Q", len(encoded)) + encoded)
            out.write(labels.astype("<i8").tobytes())
            if faiss_index is not None:
                faiss.write_index(faiss_index, faiss.PyCallbackIOWriter(out.write))  # type: ignore[attr-defined]
            file.write(struct.pack("<I", out.crc))
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
        _fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class _Loaded:
    vectors: VectorIndex | None
    high_water: int
    gaps: list[int]


def _read_snapshot(path: Path, model_id: str, options: IndexOptions) -> _Loaded:
    """The snapshot's index, when it is intact and was made for ``model_id`` with options of
    the same structure; :class:`SnapshotError` saying why not otherwise."""
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse_snapshot(data, model_id, options)
    except (OSError, ValueError) as exc:  # mmap of an empty file, unreadable file
        raise SnapshotError(f"unreadable: {exc}") from exc


def _parse_snapshot(data: mmap.mmap, model_id: str, options: IndexOptions) -> _Loaded:
    header, body_start = _snapshot_header(data)
    if header.get("model_id") != model_id:
        raise SnapshotError(f"made for model {header.get('model_id')}, not {model_id}")
    if header.get("options") != options.structure():
        raise SnapshotError("made with other index options")
    _verify_checksum(data)
    try:
        rows = int(header["rows"])
        labels_end = body_start + 8 * rows
        labels = np.frombuffer(data[body_start:labels_end], dtype="<i8").astype(np.int64)
        vectors = None
        if header["layout"] is not None:
            layout = Layout(**header["layout"])
            reader = _MemoryReader(data, labels_end, len(data) - 4)
            faiss_index = faiss.read_index(faiss.PyCallbackIOReader(reader.read))  # type: ignore[attr-defined]
            if reader.position != len(data) - 4 or faiss_index.d != layout.dimension:
                raise SnapshotError("the FAISS index does not fill the file or has the wrong dimension")
            vectors = VectorIndex(layout, options, faiss_index, labels)
        return _Loaded(vectors, int(header["high_water"]), [int(g) for g in header["gaps"]])
    except (KeyError, TypeError, ValueError, RuntimeError, SimilarityIndexError) as exc:
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError(f"damaged: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _snapshot_header(data: mmap.mmap) -> tuple[dict[str, Any], int]:
    start = len(_MAGIC) + 8
    if len(data) < start + 4 or data[: len(_MAGIC)] != _MAGIC:
        raise SnapshotError("not a similarity index snapshot")
    (size,) = struct.unpack("<Q", data[len(_MAGIC) : start])
    if size > min(_MAX_HEADER, len(data) - start - 4):
        raise SnapshotError("damaged header")
    try:
        header = json.loads(bytes(data[start : start + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"damaged header: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != _SNAPSHOT_FORMAT:
        raise SnapshotError("not a similarity index snapshot")
    if header.get("version") != _SNAPSHOT_VERSION:
        raise SnapshotError(f"format version {header.get('version')}, this node reads {_SNAPSHOT_VERSION}")
    return header, start + size


def _verify_checksum(data: mmap.mmap) -> None:
    end = len(data) - 4
    crc = 0
    for start in range(0, end, _CHUNK):
        crc = zlib.crc32(data[start : min(end, start + _CHUNK)], crc)
    (stored,) = struct.unpack("<I", data[end:])
    if crc != stored:
        raise SnapshotError("checksum mismatch (truncated or damaged file)")


class _MemoryReader:
    """FAISS's reader callback over a region of the mapped file."""

    def __init__(self, data: mmap.mmap, start: int, end: int) -> None:
        self.data, self.position, self.end = data, start, end

    def read(self, size: int) -> bytes:
        chunk = self.data[self.position : min(self.end, self.position + size)]
        self.position += len(chunk)
        return chunk
