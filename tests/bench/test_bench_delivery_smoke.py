"""The delivery benchmark at a tiny size: it runs, and its figures are plausible."""

from __future__ import annotations

import pytest

from tests.bench.bench_delivery import measure, report

pytestmark = pytest.mark.timeout(300)


def test_delivery_benchmark_runs_at_a_tiny_size() -> None:
    figures = measure(studies=1, images=1, architecture="cnn4", size=32, stable=0.5)
    assert len(figures["sr"]) == 1 and len(figures["all"]) == 1
    assert 0.5 <= figures["sr"][0] <= figures["all"][0] < 120
    assert "last instance -> SR in PACS" in report(figures, 0.5)
