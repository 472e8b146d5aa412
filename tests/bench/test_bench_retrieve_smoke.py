"""The retrieve benchmark at a tiny size, so that CI notices when it breaks.

Speed is not asserted: a shared CI machine's figures mean nothing. What is asserted is
that the benchmark runs end to end and that its figures count what they claim to: every
instance arrived at the storescp from both peers.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from tests.bench.bench_retrieve import run_benchmark

N = 10

pytestmark = pytest.mark.bench


@pytest.mark.timeout(120)
def test_retrieve_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_benchmark(
        N, "sqlite", repeat=1, workdir=tmp_path / "runs", cache_root=tmp_path / "cache", out=out
    )

    (only_round,) = result.rounds
    for run in (only_round.storescu, only_round.precedent):
        assert run.failures == [], run.failures
        assert run.received == N, run.peer
        assert run.seconds > 0
    assert result.complete

    printed = re.search(r"ratio precedent/storescu: ([0-9.]+)", out.getvalue())
    assert printed is not None, out.getvalue()
    assert float(printed.group(1)) > 0
