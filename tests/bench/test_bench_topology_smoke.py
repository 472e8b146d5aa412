"""The topology benchmark at a tiny size, so that CI notices when it breaks.

Speed is not asserted (a shared machine's figures mean nothing); what is asserted is that
both sites run end to end and that the figures count what they claim to."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.bench_topology import percentile, report, run_benchmark

pytestmark = pytest.mark.bench

N, PER_STUDY = 4, 2


@pytest.mark.timeout(120)
def test_topology_benchmark_runs_both_sites_end_to_end(tmp_path: Path) -> None:
    figures = run_benchmark(N, PER_STUDY, senders=2, workers=2, workdir=tmp_path)
    for kind, measured in figures.items():
        assert measured.studies == N // PER_STUDY, kind
        assert len(measured.latencies) == measured.studies, kind  # every study's results delivered
        assert 0 < measured.ingest_seconds < measured.everything_seconds, kind
        assert all(0 < latency < measured.everything_seconds for latency in measured.latencies), kind
        assert measured.analysis_rate > 0, kind
    embedded, multi = figures["embedded"], figures["multi-process"]
    assert {"node", "worker 1"} <= set(embedded.peak_rss)
    assert {"node", "worker 1", "worker 2", "redis", "postgresql backends (sum)"} <= set(multi.peak_rss)
    assert all(peak > 10 * 2**20 for peak in embedded.peak_rss.values())
    printed = report(figures)
    assert "study latency p99 (s)" in printed and "ratio m/e" in printed


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([3.0], 99) == 3.0
