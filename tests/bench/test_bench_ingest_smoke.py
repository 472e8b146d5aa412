"""The ingest benchmark at a tiny size, so that CI notices when it breaks.

Speed is not asserted: a shared CI machine's figures mean nothing. What is asserted
is that the benchmark runs end to end and that its figures count what they claim to:
every instance acknowledged by both peers and kept by both.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.bench.bench_ingest import prepare_files, run_benchmark, store_latencies

N = 20

pytestmark = pytest.mark.bench


@pytest.mark.timeout(60)
def test_ingest_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    workdir, cache = tmp_path / "runs", tmp_path / "cache"
    result = run_benchmark(N, 1, "sqlite", repeat=1, workdir=workdir, cache_root=cache, out=out)

    (only_round,) = result.rounds
    for run in (only_round.storescp, only_round.precedent):
        assert run.push.failures == [], run.push.failures
        assert (run.push.sent, run.push.acknowledged, run.push.refused) == (N, N, 0), run.peer
        assert len(run.push.latencies) == N, run.peer
        assert all(latency > 0 for latency in run.push.latencies), run.peer
    assert only_round.storescp.stored == N  # files storescp wrote
    assert only_round.precedent.stored == N  # rows in the node's catalog
    assert result.complete

    printed = re.search(r"ratio precedent/storescp: ([0-9.]+)", out.getvalue())
    assert printed is not None, out.getvalue()
    assert float(printed.group(1)) > 0


def test_prepared_copies_are_distinct_instances(tmp_path: Path) -> None:
    files = prepare_files(3, tmp_path)
    assert prepare_files(3, tmp_path) == files  # the second call reads the cache
    uids = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert len(uids) == 3


def test_latencies_pair_each_request_with_its_response() -> None:
    log = "\n".join(
        [
            "23:59:59.999.500  INFO: Sending file: /a.dcm",
            "23:59:59.999.600  INFO: Sending Store Request (MsgID 1, US)",
            "00:00:00.001.600  INFO: Received Store Response (Success)",
            "00:00:00.002.000  INFO: Sending Store Request (MsgID 2, US)",
            "00:00:00.005.000  INFO: Received Store Response (Success)",
        ]
    )
    assert [round(x * 1e3, 3) for x in store_latencies(log)] == [2.0, 3.0]
