"""The similarity index benchmark at a tiny size, so that CI notices when it breaks.

Speed is not asserted: a shared CI machine's figures mean nothing. What is asserted is
that every kind was built and timed for every query, that recall is measured against the
exact answers (the flat index finds all of them), that searches ran while vectors were
added, and that the catalog round trip made new rows searchable.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.bench.bench_index import clustered_vectors, run_benchmark

SIZE = 2000
DIM = 64
QUERIES = 20

pytestmark = pytest.mark.bench


def test_clustered_vectors_are_reproducible_and_clustered() -> None:
    first, again = clustered_vectors(500, 16, seed=1), clustered_vectors(500, 16, seed=1)
    assert first.shape == (500, 16) and (first == again).all()
    assert not (clustered_vectors(500, 16, seed=2) == first).all()


@pytest.mark.timeout(120)
def test_index_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_benchmark(
        [SIZE],
        DIM,
        QUERIES,
        ef_search=(64,),
        nprobe=(32,),
        adds=200,
        catalog_rows=300,
        workdir=tmp_path,
        out=out,
    )

    (size,) = result.sizes
    assert [kind.label.split()[0] for kind in size.kinds] == ["flat", "hnsw", "ivfpq"]
    for kind in [size.baseline, *size.kinds]:
        assert len(kind.latencies) == QUERIES, kind.label
        assert all(seconds > 0 for seconds in kind.latencies), kind.label
        assert kind.bytes_per_vector >= DIM * 4, kind.label  # every kind here keeps the vectors
    flat = size.kinds[0]
    assert flat.recall == 1.0
    assert all(kind.recall >= 0.8 for kind in size.kinds)
    assert all(kind.during_add and kind.adds_per_second > 0 for kind in size.kinds)
    assert result.catalog is not None and result.catalog.new_searchable
    table = out.getvalue()
    assert "faiss flat (baseline)" in table and "sync of 100 new rows" in table
