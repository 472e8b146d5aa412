"""Analysis benchmark: the worker's whole pipeline against the raw batched forward pass.

Run on demand (not a timed test; CI runs it only at a tiny size, see
``test_bench_analysis_smoke.py``)::

    python -m tests.bench.bench_analysis --n 64 --arch densenet121 --size 224 --batch 8 \\
        [--gradcam/--no-gradcam] [--repeat 3] [--catalog sqlite|postgresql] [--threads N]

Why it is built this way:

* The load is N copies, each with a new SOP Instance UID, of a real ~923 KB
  uncompressed 640 x 480 RGB ultrasound image (pydicom-data's ``US1_UNCR.dcm``),
  prepared once and cached under the temp directory, then read once before timing so
  that every run decodes from the page cache.
* The model is a bundle of the named architecture with random weights
  (``tests.support.models.tiny_bundle``): its answers mean nothing, but every layer
  costs what a trained one costs.
* The baseline is measured in the same process, in the same run: the bundle's model
  (``bundle.instantiate()``), ``model.embed`` then ``model.classify`` under
  ``torch.inference_mode()``, on the very inputs the pipeline sees, decoded and
  preprocessed once before timing and stacked into batches of ``--batch``. It runs
  under the torch thread count the worker sets for itself
  (:func:`workers.analysis.threads_for`), so both sides use the same cores.
* The pipeline is what a worker runs for each message, minus only the broker: the N
  instances stored and catalogued with their analysis requests (through
  :class:`node.ingest.Ingestor`, untimed), their ids taken from the outbox, then
  ``claim_batch(first unfinished id)`` → ``records.targets`` → ``analyzer.analyse`` →
  ``records.record`` until every row is finished. Time is wall clock from the first
  claim to the last record. It runs with Grad-CAM off (the ratio to the forward pass
  is the goal) and, unless ``--no-gradcam``, with Grad-CAM on: Grad-CAM's cost is
  (time with - time without) / forward time, a multiple of the forward pass.
* Each run gets a fresh data directory and catalog (a SQLite file, or a scratch
  PostgreSQL database), and both models get a few untimed warm-up batches (and one
  Grad-CAM batch when it is on) before timing: a worker is long-lived, and the first
  passes of a process pay for allocations and kernel selection.
* The per-stage breakdown is read back from the catalog (``analyses.timings``, written
  by the pipeline itself per image), beside the benchmark's own split of the loop
  (claim, targets, analyse, record) per image.
* Runs alternate their order across rounds (forward, pipeline, pipeline + Grad-CAM,
  then the reverse, ...) so that machine drift falls on all alike; the table reports
  medians over the rounds and the median of the per-round ratios.

On CPU, torch's large activations go through the C allocator. glibc's malloc, depending
on its history, may map and unmap them afresh on every pass; the page faults then cost up
to half the time, and differently from run to run (even from round to round). Preload
another allocator for steady figures (Debian's ``libtcmalloc-minimal4``:
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4``); the table says which
one served.

Not equal by design, and worth knowing when reading the ratio: the forward pass gets
its batches ready-made, while the pipeline decodes and preprocesses each file (in a
thread pool, overlapping the model only within one ``analyse`` call), stacks batches,
applies softmax, copies the outputs to numpy, and reads and writes the catalog around
every batch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import torch
from pydicom import dcmread
from sqlalchemy import func, select

from node.catalog.analyses import AnalysisRecords
from node.catalog.models import ANALYSES, EMBEDDINGS
from node.catalog.recording import Catalog
from node.ingest import Ingestor, ReceivedInstance
from node.settings import Settings
from node.storage import ObjectStore
from tests.bench.bench_ingest import CatalogKind, catalog_database, warm_page_cache
from tests.bench.copies import cached_copies
from tests.support.data import ultrasound_file
from tests.support.models import tiny_bundle
from tests.support.nodes import node_settings
from workers.analysis import Analyzer, choose_device, threads_for
from workers.bundles import ModelBundle, load_bundle
from workers.decode import decode_for_analysis
from workers.explain import gradcam_heatmaps
from workers.models import PrecedentModel
from workers.preprocess import preprocess
from workers.runtime import WorkerRuntime

Kind = Literal["forward", "pipeline", "pipeline+gradcam"]

# A real uncompressed ultrasound image of ~923 KB (640 x 480 RGB, Explicit VR LE).
SOURCE = ultrasound_file()
INSTANCES_PER_STUDY = 50
GOAL_RATIO = 0.9
# Rounds whose ratios differ by more than this factor were disturbed by other work: on a
# machine with few cores a busy neighbour slows torch's threads far more than its share.
NOISY_SPREAD = 1.5
STAGES = ("decode", "preprocess", "model", "gradcam", "batch_total")
LOOP_STEPS = ("claim", "targets", "analyse", "record")
# Untimed batches before each timed run: the first passes of a process pay for allocations
# (glibc raises its mmap threshold only as large blocks are freed) and kernel selection.
WARM_UP_BATCHES = 3
_CACHE_ROOT = Path(tempfile.gettempdir()) / "precedent-bench-analysis"
_CALLING_AE = "BENCH"


# --- the load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One prepared copy, with the UIDs a C-STORE request would carry."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str


def prepare_files(n: int, cache_root: Path = _CACHE_ROOT) -> list[SourceFile]:
    """N copies of :data:`SOURCE`, each a new instance, cached across runs, with the UIDs
    ingest needs."""
    files = []
    for path in cached_copies(SOURCE, n, cache_root, INSTANCES_PER_STUDY):
        header = dcmread(path, stop_before_pixels=True)
        files.append(SourceFile(path, str(header.SOPClassUID), str(header.SOPInstanceUID)))
    return files


def batched_inputs(
    files: Sequence[SourceFile], bundle: ModelBundle, settings: Settings
) -> list[torch.Tensor]:
    """The pipeline's own model inputs, decoded and preprocessed once, in batches of
    ``model.batch_size`` (the last one may be short, as the pipeline's is)."""
    tensors = [
        preprocess(frame.pixels, bundle.input)
        for source in files
        for frame in decode_for_analysis(
            source.path, settings.model.frame_policy, max_frames=settings.model.max_frames
        ).frames
    ]
    size = settings.model.batch_size
    return [torch.stack(tensors[first : first + size]) for first in range(0, len(tensors), size)]


def pipeline_settings(
    data_dir: Path, catalog_url: str, bundle: Path, batch: int, gradcam: bool, threads: int = 0
) -> Settings:
    """A worker's settings: no wait for batches to fill (every request is queued at once);
    ``threads`` 0 is the product's default (the cores shared among the worker processes)."""
    model = {
        "bundle": str(bundle),
        "batch_size": batch,
        "gradcam": gradcam,
        "batch_wait_seconds": 0,
        "threads": threads,
    }
    return node_settings(data_dir, 11112, catalog_url, model=model, queue={"worker_concurrency": 1})


# --- the baseline: the raw forward pass --------------------------------------------------------


@dataclass
class ForwardRun:
    """One timed pass of every batch through ``embed`` and ``classify``."""

    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def _forward(model: PrecedentModel, batch: torch.Tensor) -> None:
    model.classify(model.embed(batch))


def run_forward(model: PrecedentModel, batches: Sequence[torch.Tensor]) -> ForwardRun:
    """Time the batches through the model, after a few untimed warm-up batches."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in batches[:WARM_UP_BATCHES]:
            _forward(model, batch)
        _synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            _forward(model, batch)
        _synchronize(device)
        seconds = time.perf_counter() - started
    return ForwardRun(sum(len(batch) for batch in batches), seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the pipeline -----------------------------------------------------------------------------


@dataclass
class PipelineRun:
    """One timed pass of every stored instance through claim → analyse → record, and what
    the catalog held afterwards."""

    gradcam: bool
    images: int
    seconds: float
    batches: int
    loop: dict[str, float]  # seconds spent in each step of the loop, summed over batches
    states: dict[str, int]
    embeddings: int
    embedded_instances: int
    heatmaps: int
    timings: list[dict[str, float]] = field(default_factory=list)

    @property
    def kind(self) -> Kind:
        return "pipeline+gradcam" if self.gradcam else "pipeline"

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def done(self) -> int:
        return self.states.get("done", 0)

    @property
    def complete(self) -> bool:
        """Every request done, with one embedding per instance (and a heatmap when asked)."""
        return (
            self.done == self.images == sum(self.states.values())
            and self.embeddings == self.embedded_instances == self.images
            and self.heatmaps == (self.images if self.gradcam else 0)
        )

    def stage_ms(self, stage: str) -> float:
        """The mean over images of one stage of ``analyses.timings``, in ms per image
        (``batch_total`` is per batch, so it is divided by the batch's images)."""
        if not self.timings:
            return float("nan")
        if stage == "batch_total":
            values = [t["batch_total"] / t["batch_images"] for t in self.timings]
        else:
            values = [t.get(stage, 0.0) for t in self.timings]
        return statistics.fmean(values) * 1e3

    def loop_ms(self, step: str) -> float:
        """One step of the benchmark's loop, in ms per image."""
        return self.loop[step] / self.images * 1e3


def store_instances(
    files: Sequence[SourceFile], data_dir: Path, catalog_url: str, bundle_id: str, incoming: Path
) -> None:
    """Store and catalogue every file as the node does, each with its analysis request.
    The ingestor moves what it is given, so it gets a link (or copy) of each file."""
    store = ObjectStore(data_dir, fsync=False, min_free_bytes=0)
    store.prepare()
    catalog = Catalog.open(catalog_url)
    incoming.mkdir(parents=True)
    try:
        ingestor = Ingestor(
            store, catalog, max_instance_bytes=2**31, replace_duplicates=False, analyse_with=bundle_id
        )
        for source in files:
            received = incoming / source.path.name
            try:
                os.link(source.path, received)
            except OSError:  # another file system, or no hard links
                shutil.copyfile(source.path, received)
            request = ReceivedInstance(received, source.sop_class_uid, source.sop_instance_uid, _CALLING_AE)
            ingestor.ingest(request)
    finally:
        catalog.close()


def warm_up(analyzer: Analyzer, batch: torch.Tensor) -> None:
    """A few untimed passes of the worker's own model (and one of Grad-CAM, when it is on)."""
    with torch.inference_mode():
        for _ in range(WARM_UP_BATCHES):
            _forward(analyzer.model, batch.to(analyzer.device))
    if analyzer.settings.gradcam:
        gradcam_heatmaps(analyzer.model, batch.to(analyzer.device), [0] * len(batch))
    _synchronize(analyzer.device)


def analyse_all(
    runtime: WorkerRuntime, pending: Sequence[int], data_dir: Path
) -> tuple[float, int, dict[str, float]]:
    """The worker's loop over the outbox, each message naming the first unfinished row;
    returns the wall time, the number of batches and the time per loop step."""
    loop = dict.fromkeys(LOOP_STEPS, 0.0)
    remaining = list(pending)
    batches = 0
    started = time.perf_counter()
    while remaining:
        t0 = time.perf_counter()
        claim = runtime.claim_batch(remaining[0])
        t1 = time.perf_counter()
        if not claim.ids:
            raise RuntimeError(f"analysis {remaining[0]} could not be claimed")
        targets = runtime.records.targets(claim)
        t2 = time.perf_counter()
        results = runtime.analyzer.analyse(targets, data_dir)
        t3 = time.perf_counter()
        runtime.records.record(claim, runtime.model_id, results)
        t4 = time.perf_counter()
        for step, seconds in zip(LOOP_STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            loop[step] += seconds
        batches += 1
        claimed = set(claim.ids)
        remaining = [i for i in remaining if i not in claimed]
    return time.perf_counter() - started, batches, loop


def catalogued_results(
    records: AnalysisRecords,
) -> tuple[dict[str, int], int, int, int, list[dict[str, float]]]:
    """States, embeddings (rows and distinct instances), heatmaps and per-image timings."""
    a, e = ANALYSES.c, EMBEDDINGS.c
    with records.catalog.connection() as connection:
        states = {s: int(n) for s, n in connection.execute(select(a.state, func.count()).group_by(a.state))}
        embeddings, embedded = connection.execute(
            select(func.count(), func.count(func.distinct(e.instance_pk)))
        ).one()
        heatmaps = connection.execute(select(func.count()).where(a.heatmap.is_not(None))).scalar_one()
        timings = [
            dict(t) for t in connection.execute(select(a.timings).where(a.timings.is_not(None))).scalars()
        ]
    return states, int(embeddings), int(embedded), int(heatmaps), timings


def run_pipeline(
    files: Sequence[SourceFile],
    bundle: ModelBundle,
    batch: int,
    gradcam: bool,
    workdir: Path,
    catalog: CatalogKind,
    warm_up_batch: torch.Tensor,
    threads: int = 0,
) -> PipelineRun:
    """The stored instances through a fresh :class:`WorkerRuntime`, model loaded and warmed
    up before timing."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    with catalog_database(catalog, data_dir) as url:
        store_instances(files, data_dir, url, bundle.id, workdir / "incoming")
        runtime = WorkerRuntime(pipeline_settings(data_dir, url, bundle.path, batch, gradcam, threads))
        try:
            warm_up(runtime.analyzer, warm_up_batch)
            pending = runtime.records.analyses.take_unpublished(10**6)
            seconds, batches, loop = analyse_all(runtime, pending, data_dir)
            states, embeddings, embedded, heatmaps, timings = catalogued_results(runtime.records)
        finally:
            runtime.close()
    return PipelineRun(
        gradcam, len(files), seconds, batches, loop, states, embeddings, embedded, heatmaps, timings
    )


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Round:
    forward: ForwardRun
    pipeline: PipelineRun
    pipeline_gradcam: PipelineRun | None

    @property
    def ratio(self) -> float:
        """Pipeline (no Grad-CAM) images/s over forward images/s."""
        return self.pipeline.images_per_second / self.forward.images_per_second

    @property
    def gradcam_cost(self) -> float:
        """Grad-CAM's extra wall time as a multiple of the forward pass's."""
        if self.pipeline_gradcam is None:
            return float("nan")
        return (self.pipeline_gradcam.seconds - self.pipeline.seconds) / self.forward.seconds

    def pipelines(self) -> list[PipelineRun]:
        return [self.pipeline] + ([self.pipeline_gradcam] if self.pipeline_gradcam else [])


@dataclass
class BenchResult:
    n: int
    architecture: str
    size: int
    batch: int
    threads: int
    device: str
    catalog: CatalogKind
    rounds: list[Round]

    @property
    def gradcam(self) -> bool:
        return all(r.pipeline_gradcam is not None for r in self.rounds)

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios: each round's runs are adjacent in time."""
        return statistics.median(r.ratio for r in self.rounds)

    @property
    def gradcam_cost(self) -> float:
        if not self.gradcam:
            return float("nan")
        return statistics.median(r.gradcam_cost for r in self.rounds)

    def pipelines(self, gradcam: bool) -> list[PipelineRun]:
        return [p for r in self.rounds for p in r.pipelines() if p.gradcam == gradcam]

    @property
    def complete(self) -> bool:
        return all(p.complete for r in self.rounds for p in r.pipelines())

    def table(self) -> str:
        kb = SOURCE.stat().st_size / 1e3
        lines = [
            f"analysis: {self.n} x {kb:.0f} KB ({SOURCE.name}), {self.architecture} at {self.size} px, "
            f"batch {self.batch}, {self.device} with {self.threads} torch threads, "
            f"catalog={self.catalog}, rounds={len(self.rounds)}, allocator: {allocator()}",
            f"{'run':<18} {'img/s':>8} {'ms/img':>8} {'batches':>8} {'done':>9} {'embedded':>9}",
        ]
        forward = statistics.median(r.forward.images_per_second for r in self.rounds)
        lines.append(f"{'forward':<18} {forward:8.2f} {1e3 / forward:8.2f} {-(-self.n // self.batch):8d}")
        kinds = [False, True] if self.gradcam else [False]
        for gradcam in kinds:
            runs = self.pipelines(gradcam)
            rate = statistics.median(p.images_per_second for p in runs)
            done = f"{min(p.done for p in runs)}/{self.n}"
            embedded = f"{min(p.embedded_instances for p in runs)}/{self.n}"
            cells = f"{rate:8.2f} {1e3 / rate:8.2f} {runs[0].batches:8d} {done:>9} {embedded:>9}"
            lines.append(f"{runs[0].kind:<18} {cells}")
        lines.append(f"ratio pipeline/forward (no Grad-CAM): {self.ratio:.2f} (goal {GOAL_RATIO})")
        if self.gradcam:
            lines.append(f"Grad-CAM cost: {self.gradcam_cost:.1f} x forward")
        lines.append("stages from analyses.timings, ms/image (mean over images, median over rounds):")
        lines.append(f"  {'run':<18}" + "".join(f" {s:>11}" for s in STAGES))
        for gradcam in kinds:
            runs = self.pipelines(gradcam)
            cells = "".join(f" {statistics.median(p.stage_ms(s) for p in runs):11.2f}" for s in STAGES)
            lines.append(f"  {runs[0].kind:<18}{cells}")
        lines.append("the loop, ms/image (median over rounds):")
        lines.append(f"  {'run':<18}" + "".join(f" {s:>11}" for s in LOOP_STEPS))
        for gradcam in kinds:
            runs = self.pipelines(gradcam)
            cells = "".join(f" {statistics.median(p.loop_ms(s) for p in runs):11.2f}" for s in LOOP_STEPS)
            lines.append(f"  {runs[0].kind:<18}{cells}")
        for index, r in enumerate(self.rounds, 1):
            line = (
                f"  round {index}: forward {r.forward.images_per_second:.2f} img/s, "
                f"pipeline {r.pipeline.images_per_second:.2f}"
            )
            if r.pipeline_gradcam is not None:
                line += f", pipeline+gradcam {r.pipeline_gradcam.images_per_second:.2f}"
            line += f"; ratio {r.ratio:.3f}"
            if r.pipeline_gradcam is not None:
                line += f", Grad-CAM cost {r.gradcam_cost:.2f} x forward"
            lines.append(line)
        ratios = [r.ratio for r in self.rounds]
        if max(ratios) > NOISY_SPREAD * min(ratios):
            lines.append(
                f"WARNING: the rounds disagree (ratio {min(ratios):.2f} to {max(ratios):.2f}): "
                "something else was using the cores; run again on a quiet machine"
            )
        if not self.complete:
            lines.append("WARNING: some analyses did not finish as done with one embedding each")
        return "\n".join(lines)


def allocator() -> str:
    """What serves torch's CPU allocations: glibc's malloc unless another one is preloaded."""
    preloaded = [Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()]
    return ", ".join(preloaded) or "glibc malloc"


def run_benchmark(
    n: int,
    architecture: str = "densenet121",
    size: int = 224,
    batch: int = 8,
    gradcam: bool = True,
    repeat: int = 3,
    catalog: CatalogKind = "sqlite",
    threads: int = 0,
    *,
    workdir: Path | None = None,
    cache_root: Path = _CACHE_ROOT,
    out: TextIO = sys.stdout,
) -> BenchResult:
    """Run ``repeat`` rounds of (forward, pipeline[, pipeline + Grad-CAM]), alternating
    their order, print the table to ``out`` and return the figures."""
    files = prepare_files(n, cache_root)
    warm_page_cache([source.path for source in files])
    rounds: list[Round] = []
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-analysis-")))
        root.mkdir(parents=True, exist_ok=True)
        bundle = load_bundle(tiny_bundle(root / f"{architecture}-{size}.pt", architecture, size))
        settings = pipeline_settings(root, "", bundle.path, batch, gradcam, threads)
        threads = threads_for(settings.model.threads, settings.queue.worker_concurrency)
        device = choose_device(settings.model.device)
        torch.set_num_threads(threads)  # as the worker's Analyzer does for itself
        batches = [b.to(device) for b in batched_inputs(files, bundle, settings)]
        model = bundle.instantiate(device)
        kinds: list[Kind] = ["forward", "pipeline"]
        if gradcam:
            kinds.append("pipeline+gradcam")
        for index in range(repeat):
            order = kinds if index % 2 == 0 else kinds[::-1]
            forward: ForwardRun | None = None
            pipelines: dict[bool, PipelineRun] = {}
            for kind in order:
                if kind == "forward":
                    forward = run_forward(model, batches)
                    rate = forward.images_per_second
                else:
                    on = kind == "pipeline+gradcam"
                    run_dir = root / f"round-{index + 1}-{kind}"
                    pipelines[on] = run_pipeline(
                        files, bundle, batch, on, run_dir, catalog, batches[0], threads
                    )
                    rate = pipelines[on].images_per_second
                    shutil.rmtree(run_dir / "data" / "objects", ignore_errors=True)
                print(f"round {index + 1} {kind}: {rate:.2f} img/s", file=sys.stderr)
            assert forward is not None
            rounds.append(Round(forward, pipelines[False], pipelines.get(True)))
    result = BenchResult(n, architecture, size, batch, threads, device.type, catalog, rounds)
    print(result.table(), file=out, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=64, help="instances per run (default 64)")
    parser.add_argument("--arch", default="densenet121", help="model architecture (default densenet121)")
    parser.add_argument("--size", type=int, default=224, help="model input size in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=8, help="model.batch_size (default 8)")
    parser.add_argument(
        "--gradcam",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the pipeline with Grad-CAM on (default: yes)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (forward, pipelines)")
    parser.add_argument("--catalog", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--threads", type=int, default=0, help="model.threads (default 0: the worker's own choice)"
    )
    parser.add_argument("--workdir", type=Path, help="a new directory for the runs (default: temp)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.repeat < 1 or args.threads < 0:
        parser.error("--n, --batch and --repeat must be at least 1, --threads at least 0")
    result = run_benchmark(
        args.n,
        args.arch,
        args.size,
        args.batch,
        args.gradcam,
        args.repeat,
        args.catalog,
        args.threads,
        workdir=args.workdir,
    )
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
