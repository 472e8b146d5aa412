"""The analysis benchmark at a tiny size, so that CI notices when it breaks.

Speed is not asserted: a shared CI machine's figures mean nothing. What is asserted
is that the benchmark runs end to end and that its figures count what they claim to:
every instance analysed by every pipeline run, as the catalog records it (each request
done, one embedding per instance, a heatmap each when Grad-CAM is on), every image
through the forward pass, and a ratio printed as a positive number.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.bench.bench_analysis import STAGES, prepare_files, run_benchmark
from workers.runtime import BATCHES_PER_CLAIM

N = 8
BATCH = 4

pytestmark = pytest.mark.bench


@pytest.mark.timeout(120)
def test_analysis_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = io.StringIO()
    workdir, cache = tmp_path / "runs", tmp_path / "cache"
    result = run_benchmark(
        N, "cnn4", 64, BATCH, gradcam=True, repeat=1, workdir=workdir, cache_root=cache, out=out
    )

    (only_round,) = result.rounds
    assert only_round.forward.images == N
    assert only_round.forward.seconds > 0
    assert only_round.pipeline_gradcam is not None
    for run in (only_round.pipeline, only_round.pipeline_gradcam):
        assert run.states == {"done": N}, run.kind
        assert (run.embeddings, run.embedded_instances) == (N, N), run.kind  # one each
        assert run.heatmaps == (N if run.gradcam else 0), run.kind
        claimed = BATCH * BATCHES_PER_CLAIM  # rows one claim takes, decoded while the model runs
        assert run.batches == -(-N // claimed), run.kind
        assert run.seconds > 0, run.kind
        assert len(run.timings) == N, run.kind  # read back from analyses.timings
        assert all(set(STAGES) <= set(t) and t["batch_images"] == min(N, claimed) for t in run.timings), (
            run.kind
        )
    assert all(t["gradcam"] == 0 for t in only_round.pipeline.timings)
    assert all(t["gradcam"] > 0 for t in only_round.pipeline_gradcam.timings)
    assert result.complete

    printed = re.search(r"ratio pipeline/forward \(no Grad-CAM\): ([0-9.]+)", out.getvalue())
    assert printed is not None, out.getvalue()
    assert float(printed.group(1)) > 0
    assert re.search(r"Grad-CAM cost: -?[0-9.]+ x forward", out.getvalue()), out.getvalue()


def test_prepared_copies_are_distinct_instances(tmp_path: Path) -> None:
    files = prepare_files(3, tmp_path)
    assert prepare_files(3, tmp_path) == files  # the second call reads the cache
    uids = {str(dcmread(source.path, stop_before_pixels=True).SOPInstanceUID) for source in files}
    assert uids == {source.sop_instance_uid for source in files}
    assert len(uids) == 3
