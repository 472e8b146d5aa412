"""Retrieval metrics, one implementation for the tests, ``precedent evaluate`` and the
benchmarks: precision, recall and NDCG at k, average precision, and a leave-one-out
evaluation in the shape of the retrieval paper's Table 1 (Rahman et al.: P@k, R@k, NDCG@k
and search time for k = 1, 5, 10, 20, 50, 100, L2 and cosine side by side).

Relevance is binary: a result is relevant when it carries the query's label. Every metric
takes a *relevance matrix*, one row per query and one column per rank (rank 1 first), so
that a whole evaluation is computed with array operations; a 1-D ranking is one query.
``total_relevant`` is, per query, how many relevant items exist among the items it could
retrieve (in leave-one-out: the other items with its label); it must be at least 1, since
recall, NDCG and average precision mean nothing for a query with nothing to find.

A ranking shorter than k (fewer items than k) counts the missing ranks as not relevant:
P@k still divides by k.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from workers.index import IndexOptions, Metric, VectorIndex

PAPER_KS = (1, 5, 10, 20, 50, 100)
# Rankings are computed this many matrix cells at a time (int64 ids: 256 MB).
_BLOCK_CELLS = 32_000_000
# Timing every query of a large set says nothing more than timing a thousand of them.
_TIMED_QUERIES = 1000


def precision_at_k(relevance: ArrayLike, k: int) -> np.ndarray:
    """Per query: the relevant results among the first ``k``, divided by ``k``."""
    matrix = _relevance(relevance)
    return np.asarray(_hits(matrix, _positive("k", k)) / k, dtype=np.float64)


def recall_at_k(relevance: ArrayLike, total_relevant: ArrayLike, k: int) -> np.ndarray:
    """Per query: the relevant results among the first ``k``, divided by all relevant items."""
    matrix = _relevance(relevance)
    return np.asarray(_hits(matrix, _positive("k", k)) / _totals(total_relevant, matrix), dtype=np.float64)


def ndcg_at_k(relevance: ArrayLike, total_relevant: ArrayLike, k: int) -> np.ndarray:
    """Per query: DCG of the first ``k`` results (gain 1 for a relevant one at rank i,
    discounted by ``log2(i + 1)``) over the ideal DCG (all ``min(k, total_relevant)``
    relevant items first)."""
    matrix = _relevance(relevance)
    k = _positive("k", k)
    totals = _totals(total_relevant, matrix)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    shown = matrix[:, :k]
    dcg = shown @ discounts[: shown.shape[1]]
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(totals, k)]
    return np.asarray(dcg / ideal, dtype=np.float64)


def average_precision(relevance: ArrayLike, total_relevant: ArrayLike) -> np.ndarray:
    """Per query: the mean over all relevant items of the precision at the rank where each
    is retrieved (0 for one the ranking does not reach)."""
    matrix = _relevance(relevance)
    totals = _totals(total_relevant, matrix)
    ranks = np.arange(1, matrix.shape[1] + 1)
    precision_at_hits = np.where(matrix, np.cumsum(matrix, axis=1) / ranks, 0.0)
    return np.asarray(precision_at_hits.sum(axis=1) / totals, dtype=np.float64)


def mean_average_precision(relevance: ArrayLike, total_relevant: ArrayLike) -> float:
    """The mean of :func:`average_precision` over the queries."""
    return float(average_precision(relevance, total_relevant).mean())


def _relevance(relevance: ArrayLike) -> np.ndarray:
    matrix = np.asarray(relevance)
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2:
        raise ValueError(f"relevance must be one ranking or one ranking per row, not shape {matrix.shape}")
    return matrix.astype(bool).astype(np.float64)


def _hits(matrix: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(matrix[:, :k].sum(axis=1), dtype=np.float64)


def _totals(total_relevant: ArrayLike, matrix: np.ndarray) -> np.ndarray:
    totals = np.broadcast_to(np.asarray(total_relevant, dtype=np.int64), (matrix.shape[0],))
    if (totals < 1).any():
        raise ValueError("total_relevant must be at least 1 for every query (nothing to retrieve otherwise)")
    if (totals < matrix.sum(axis=1)).any():
        raise ValueError("a ranking holds more relevant results than total_relevant says exist")
    return totals


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


@dataclass(frozen=True)
class RetrievalReport:
    """Leave-one-out retrieval over one labelled embedding set with one metric: means over
    the queries that have at least one other item with their label."""

    metric: Metric
    items: int
    queries: int
    skipped: int  # items whose label no other item has: nothing to retrieve
    precision: dict[int, float]
    recall: dict[int, float]
    ndcg: dict[int, float]
    mean_average_precision: float
    search_seconds: float  # mean wall time of one query's search for max(ks) results
    timed_queries: int

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(self.precision)


def evaluate_retrieval(
    embeddings: ArrayLike,
    labels: Sequence[object] | np.ndarray,
    ks: Sequence[int] = PAPER_KS,
    metric: Metric = "cosine",
) -> RetrievalReport:
    """Each item queries all the others (leave-one-out) through an exact (flat) index of
    ``metric``, as the node's index answers; relevant = same label.

    The search time is that of one query at a time for ``max(ks)`` results (the node
    answers one image at a time), averaged over up to 1000 queries spread over the set.
    """
    vectors = np.asarray(embeddings, dtype=np.float32)
    codes = _label_codes(labels, vectors)
    ks = tuple(sorted({_positive("k", k) for k in ks}))
    if not ks:
        raise ValueError("ks must name at least one k")
    totals = np.bincount(codes)[codes] - 1
    queries = np.flatnonzero(totals > 0)
    if queries.size == 0:
        raise ValueError("no label is shared by two items: there is nothing to retrieve")
    index = VectorIndex.build(
        "flat", metric, IndexOptions(kind="flat", metric=metric), np.arange(len(codes)), vectors
    )
    sums = _ranking_sums(index, vectors, codes, totals, queries, ks)
    seconds, timed = _search_time(index, vectors, queries, max(ks))
    return RetrievalReport(
        metric=metric,
        items=len(codes),
        queries=int(queries.size),
        skipped=len(codes) - int(queries.size),
        precision={k: sums[("p", k)] / queries.size for k in ks},
        recall={k: sums[("r", k)] / queries.size for k in ks},
        ndcg={k: sums[("n", k)] / queries.size for k in ks},
        mean_average_precision=sums[("ap", 0)] / queries.size,
        search_seconds=seconds,
        timed_queries=timed,
    )


def _label_codes(labels: Sequence[object] | np.ndarray, vectors: np.ndarray) -> np.ndarray:
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"embeddings must be a 2-D array of at least two items, not shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if len(labels) != vectors.shape[0]:
        raise ValueError(f"{len(labels)} labels for {vectors.shape[0]} embeddings")
    _, codes = np.unique(np.asarray([str(label) for label in labels]), return_inverse=True)
    return np.asarray(codes, dtype=np.int64).reshape(-1)


def _ranking_sums(
    index: VectorIndex,
    vectors: np.ndarray,
    codes: np.ndarray,
    totals: np.ndarray,
    queries: np.ndarray,
    ks: tuple[int, ...],
) -> dict[tuple[str, int], float]:
    """Sums of every metric over the queries, from each query's ranking of all other items."""
    n = len(codes)
    block = max(1, _BLOCK_CELLS // n)
    sums: dict[tuple[str, int], float] = {}
    for start in range(0, queries.size, block):
        chosen = queries[start : start + block]
        ranked, _ = index.search_arrays(vectors[chosen], n)
        others = ranked[ranked != chosen[:, None]].reshape(chosen.size, n - 1)  # itself left out
        relevance = codes[others] == codes[chosen][:, None]
        total = totals[chosen]
        for k in ks:
            _accumulate(sums, ("p", k), precision_at_k(relevance, k))
            _accumulate(sums, ("r", k), recall_at_k(relevance, total, k))
            _accumulate(sums, ("n", k), ndcg_at_k(relevance, total, k))
        _accumulate(sums, ("ap", 0), average_precision(relevance, total))
    return sums


def _accumulate(sums: dict[tuple[str, int], float], key: tuple[str, int], values: np.ndarray) -> None:
    sums[key] = sums.get(key, 0.0) + float(values.sum())


def _search_time(index: VectorIndex, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[float, int]:
    timed = queries[np.linspace(0, queries.size - 1, min(queries.size, _TIMED_QUERIES)).astype(np.int64)]
    started = time.perf_counter()
    for query in timed.tolist():
        index.search(vectors[query], k, exclude={query})
    return (time.perf_counter() - started) / timed.size, int(timed.size)


def retrieval_table(reports: Sequence[RetrievalReport]) -> str:
    """The reports side by side, one row per k: P@k, R@k and NDCG@k for each metric, then
    mAP and the mean search time per query."""
    if not reports:
        return ""
    ks = reports[0].ks
    head = " | ".join(f"{r.metric + ':':<8}{'P@k':>6} {'R@k':>6} {'NDCG@k':>7}" for r in reports)
    first = reports[0]
    lines = [
        f"leave-one-out retrieval: {first.items} items, {first.queries} queries "
        f"({first.skipped} without another item of their label)",
        f"{'k':>5} | {head}",
    ]
    for k in ks:
        cells = " | ".join(
            f"{'':<8}{r.precision[k]:6.3f} {r.recall[k]:6.3f} {r.ndcg[k]:7.3f}" for r in reports
        )
        lines.append(f"{k:>5} | {cells}")
    lines.append(
        f"{'mAP':>5} | " + " | ".join(f"{'':<8}{r.mean_average_precision:6.3f}{'':>15}" for r in reports)
    )
    lines.append(
        f"{'ms':>5} | "
        + " | ".join(f"{'':<8}{r.search_seconds * 1e3:6.3f}{'':>15}" for r in reports)
        + f"   (mean search time per query, k={max(ks)})"
    )
    return "\n".join(lines)
