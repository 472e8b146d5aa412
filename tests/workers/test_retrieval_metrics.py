"""Retrieval metrics against values computed by hand, and the leave-one-out evaluation on a
set small enough to rank on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.retrieval_metrics import (
    average_precision,
    evaluate_retrieval,
    mean_average_precision,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    retrieval_table,
)

# One query's ranking: relevant at ranks 1 and 3; a third relevant item is not retrieved.
RANKING = [1, 0, 1, 0, 0]
RELEVANT = 3
LOG2_3 = math.log2(3)  # 1.58496


def test_precision_counts_hits_among_the_first_k() -> None:
    # P@1 = 1/1, P@2 = 1/2, P@3 = 2/3, P@5 = 2/5
    assert [precision_at_k(RANKING, k)[0] for k in (1, 2, 3, 5)] == pytest.approx([1, 1 / 2, 2 / 3, 2 / 5])


def test_a_ranking_shorter_than_k_still_divides_by_k() -> None:
    # one item to retrieve, found first: P@5 = 1/5, R@5 = 1/1, NDCG@5 = (1/log2 2) / (1/log2 2)
    assert precision_at_k([1], 5)[0] == pytest.approx(0.2)
    assert recall_at_k([1], 1, 5)[0] == pytest.approx(1.0)
    assert ndcg_at_k([1], 1, 5)[0] == pytest.approx(1.0)


def test_recall_divides_by_every_relevant_item() -> None:
    # R@1 = 1/3, R@3 = 2/3, R@5 = 2/3 (the third relevant item is never retrieved)
    assert [recall_at_k(RANKING, RELEVANT, k)[0] for k in (1, 3, 5)] == pytest.approx([1 / 3, 2 / 3, 2 / 3])


def test_ndcg_discounts_by_log2_of_the_rank() -> None:
    # DCG@3 = 1/log2(2) + 0/log2(3) + 1/log2(4) = 1 + 0.5 = 1.5
    # IDCG@3 (3 relevant items exist) = 1 + 1/log2(3) + 1/log2(4) = 2.13093
    ideal = 1 + 1 / LOG2_3 + 0.5
    assert ndcg_at_k(RANKING, RELEVANT, 3)[0] == pytest.approx(1.5 / ideal)  # 0.70392
    # @5: no more hits, and the ideal ranking has only 3 relevant items to place
    assert ndcg_at_k(RANKING, RELEVANT, 5)[0] == pytest.approx(1.5 / ideal)
    assert ndcg_at_k(RANKING, RELEVANT, 1)[0] == pytest.approx(1.0)
    # [0, 1, 1], 2 relevant: DCG@2 = 1/log2(3) = 0.63093, IDCG@2 = 1 + 1/log2(3) = 1.63093
    assert ndcg_at_k([0, 1, 1], 2, 2)[0] == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))  # 0.38685


def test_average_precision_averages_precision_at_each_relevant_item() -> None:
    # AP = (P@1 + P@3) / 3 = (1 + 2/3) / 3 = 5/9: the unretrieved item contributes 0
    assert average_precision(RANKING, RELEVANT)[0] == pytest.approx(5 / 9)
    # [0, 1, 1], 2 relevant: AP = (1/2 + 2/3) / 2 = 7/12
    assert average_precision([0, 1, 1], 2)[0] == pytest.approx(7 / 12)
    # mAP over both = (5/9 + 7/12) / 2 = 41/72 = 0.56944
    both = [[1, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert mean_average_precision(both, [3, 2]) == pytest.approx(41 / 72)


def test_rows_are_queries() -> None:
    both = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=bool)
    assert precision_at_k(both, 2) == pytest.approx([0.5, 0.5])
    assert recall_at_k(both, [3, 2], 2) == pytest.approx([1 / 3, 1 / 2])


def test_meaningless_questions_are_refused() -> None:
    with pytest.raises(ValueError, match="total_relevant must be at least 1"):
        recall_at_k([0, 0], 0, 1)
    with pytest.raises(ValueError, match="more relevant results than total_relevant"):
        average_precision([1, 1], 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        precision_at_k([1], 0)


# Four points on a line and a far loner; Euclidean distances, leave-one-out:
#   A(0) X: B 1, C 2.4, D 4, E 10 -> ranking B(Y) C(X) D(Y) E(Z) -> relevance 0 1 0 0, 1 relevant
#   B(1) Y: A 1, C 1.4, D 3      -> A(X) C(X) D(Y) E           -> 0 0 1 0, 1 relevant
#   C(2.4) X: B 1.4, D 1.6, A 2.4 -> B(Y) D(Y) A(X) E          -> 0 0 1 0, 1 relevant
#   D(4) Y: C 1.6, B 3, A 4      -> C(X) B(Y) A(X) E           -> 0 1 0 0, 1 relevant
#   E(10) Z: no other Z: skipped as a query
# P@1 = 0; P@2 = (1/2 + 0 + 0 + 1/2) / 4 = 0.25; P@3 = 1/3 for each
# R@2 = (1 + 0 + 0 + 1) / 4 = 0.5; R@3 = 1
# NDCG@2 = (1/log2 3 + 0 + 0 + 1/log2 3) / 4 = 0.31546 (ideal: the one relevant item first, 1)
# NDCG@3 = (1/log2 3 + 1/2 + 1/2 + 1/log2 3) / 4 = 0.56546
# mAP = (1/2 + 1/3 + 1/3 + 1/2) / 4 = 5/12
LINE = np.array([[0, 0], [1, 0], [2.4, 0], [4, 0], [10, 0]], dtype=np.float32)
LINE_LABELS = ["X", "Y", "X", "Y", "Z"]


def test_leave_one_out_on_a_set_ranked_by_hand() -> None:
    report = evaluate_retrieval(LINE, LINE_LABELS, ks=(1, 2, 3), metric="l2")

    assert (report.items, report.queries, report.skipped) == (5, 4, 1)
    assert report.precision == pytest.approx({1: 0.0, 2: 0.25, 3: 1 / 3})
    assert report.recall == pytest.approx({1: 0.0, 2: 0.5, 3: 1.0})
    assert report.ndcg == pytest.approx({1: 0.0, 2: (2 / LOG2_3) / 4, 3: (2 / LOG2_3 + 1) / 4})
    assert report.mean_average_precision == pytest.approx(5 / 12)
    assert report.search_seconds > 0 and report.timed_queries == 4


def test_the_paper_table_shows_both_metrics_side_by_side() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    embeddings = rng.standard_normal((300, 16)).astype(np.float32) + labels[:, None]

    reports = [evaluate_retrieval(embeddings, labels.tolist(), metric=metric) for metric in ("l2", "cosine")]
    table = retrieval_table(reports)

    for report in reports:
        assert report.ks == (1, 5, 10, 20, 50, 100)
        assert all(0 <= value <= 1 for value in (*report.precision.values(), *report.ndcg.values()))
        assert report.recall[100] > report.recall[1]
        assert report.precision[1] > 0.5  # labels drive the embedding: neighbours mostly agree
    assert "l2:" in table and "cosine:" in table and "mAP" in table
    assert len(table.splitlines()) == 2 + 6 + 2


def test_an_evaluation_needs_something_to_retrieve() -> None:
    with pytest.raises(ValueError, match="no label is shared by two items"):
        evaluate_retrieval(LINE[:2], ["X", "Y"])
    with pytest.raises(ValueError, match="3 labels for 5 embeddings"):
        evaluate_retrieval(LINE, ["X", "Y", "X"])
