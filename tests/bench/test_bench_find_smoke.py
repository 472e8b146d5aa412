"""The query benchmark at a tiny size, so that CI notices when it breaks.

Speed is not asserted: a shared CI machine's figures mean nothing. What is asserted is
that the benchmark runs end to end and that its figures count what they claim to: every
query, through the node and on the database, returned the number of studies the
benchmark generated for it.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.bench.bench_find import QUERY_KINDS, STUDIES_PER_PATIENT, Expected, run_benchmark

STUDIES = 500
QUERIES = 4

pytestmark = pytest.mark.bench


def test_expected_counts_add_up() -> None:
    expected = Expected.of(STUDIES)
    assert sum(expected.per_patient.values()) == STUDIES
    assert set(expected.per_patient.values()) == {STUDIES_PER_PATIENT}
    assert sum(expected.per_surname.values()) == STUDIES
    assert sum(expected.per_day.values()) == STUDIES


@pytest.mark.timeout(120)
def test_find_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_benchmark(STUDIES, "sqlite", QUERIES, workdir=tmp_path / "run", out=out)

    assert result.fill_seconds > 0
    assert list(result.timings) == list(QUERY_KINDS)
    for kind, timings in result.timings.items():
        assert timings.failures == [], kind
        assert len(timings.node) == len(timings.database) == len(timings.matches) == QUERIES, kind
        assert all(seconds > 0 for seconds in (*timings.node, *timings.database)), kind
        for expected, node, database in timings.matches:
            assert node == database == expected, kind
        if kind == "patient_id":
            assert {e for e, _, _ in timings.matches} == {STUDIES_PER_PATIENT}
        if kind == "patient_name":  # a surname in use; a date range may match none at this size
            assert all(e > 0 for e, _, _ in timings.matches)
    assert result.complete

    table = out.getvalue()
    for kind in QUERY_KINDS:
        assert kind in table
    assert "WARNING" not in table
