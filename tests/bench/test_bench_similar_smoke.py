"""The similarity C-FIND benchmark at a tiny size: it runs, and its figures are plausible."""

from __future__ import annotations

import pytest

from tests.bench.bench_similar import K, report, run

pytestmark = pytest.mark.timeout(300)


def test_similarity_benchmark_runs_at_a_tiny_size() -> None:
    figures, kind = run(studies=60, dim=16, queries=5)
    assert kind == "flat"
    assert len(figures["node"]) == len(figures["index"]) == 5
    assert all(0 < i < n for i, n in zip(figures["index"], figures["node"], strict=True))
    assert f"k = {K}" in report(figures, kind)
