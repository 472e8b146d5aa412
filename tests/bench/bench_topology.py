"""Topology benchmark: the multi-process site of ``deploy/compose.yaml`` against the
single-process default, under the same load.

Run on demand (CI runs it only at a tiny size, see ``test_bench_topology_smoke.py``)::

    python -m tests.bench.bench_topology --n 1000 --per-study 10 --senders 4 [--workers 2]

The two sites (``tests.deploy.topology``):

* embedded: `precedent serve` as ``deploy/run.sh`` runs it — one local worker, the embedded
  broker, SQLite;
* multi-process: `precedent serve` with ``queue.serve_workers = 0``, ``--workers`` separate
  `precedent worker` processes (the cores shared among them by ``model.threads``, tcmalloc
  preloaded as the unit files do), Redis and a scratch PostgreSQL database.

Both send every result to the same kind of PACS (an Orthanc on loopback), use the tiny
cnn4 bundle at 64 px with Grad-CAM, ``study.stable_seconds = 1`` and quick polling, so that
the figures are the pipeline's, not its waits. The load is N small phantoms (128 x 192,
8-bit), ``--per-study`` to a study, pushed by ``--senders`` concurrent storescu processes,
each sending whole studies. Each site is started, waited on until ``/healthz`` answers 200,
and warmed up with ``--workers`` studies (a worker's first tasks pay for its lazy imports,
seconds; each site gets the same warm-up), then timed on the load alone:

* ingest: N / wall time from the first storescu start to the last one's exit;
* analysis: analyses per second from the first finished to the last (catalog times);
* everything: from the first storescu start until every study is assessed and every
  result held by the PACS;
* latency per study: from its last instance received to its last result delivered (the
  PACS's Success), both as the catalog recorded them; p50 and p99 over the studies. Under
  a burst of N instances this includes the time a study waits behind the backlog;
* peak memory: VmHWM of each process of the site, read just before it stops; for
  PostgreSQL, the sum over the backends serving the database (shared buffers they touched
  are counted in each, so the sum overstates).

Not equal by design: the embedded site runs one worker with all the cores, the
multi-process one ``--workers`` workers sharing them, and pays for Redis and PostgreSQL on
the same two cores; on one machine the multi-process site is a rehearsal of the topology,
not a way to go faster. Other work on the machine moves the figures: the load average is
printed before and after each run.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.topology import (
    Kind,
    RunningSite,
    analysis_span,
    embedded_site,
    everything_delivered,
    multi_process_site,
    peak_rss,
    phantom_copies,
    postgres_backends,
    push,
    study_latencies,
)
from tests.support.endpoint import health
from tests.support.models import tiny_bundle
from tests.support.waiting import wait_until

KINDS: tuple[Kind, ...] = ("embedded", "multi-process")


@dataclass
class Figures:
    kind: Kind
    instances: int
    studies: int
    ingest_seconds: float
    analysis_rate: float
    everything_seconds: float
    latencies: list[float]
    peak_rss: dict[str, int] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)

    @property
    def ingest_rate(self) -> float:
        return self.instances / self.ingest_seconds


def measure(
    kind: Kind, n: int, per_study: int, senders: int, workers: int, root: Path, bundle: Path
) -> Figures:
    """Start a site of ``kind`` under ``root``, warm it up, push the load, wait for every
    result in the PACS, and read the figures of the load alone."""
    warm_up = phantom_copies(root / "warm-up", workers * per_study, per_study)
    files = phantom_copies(root / "load", n, per_study)
    studies = math.ceil(n / per_study)
    site_root = root / kind
    started_site = (
        multi_process_site(site_root, bundle, workers)
        if kind == "multi-process"
        else embedded_site(site_root, bundle)
    )
    with started_site as running:
        url = running.site.catalog_url
        wait_until(lambda: health(running.metrics_port)[0] == 200, 120, f"the {kind} site is healthy")
        _push(running, warm_up, senders, per_study)
        warmed = f"the {kind} site warmed up"
        wait_until(lambda: everything_delivered(running, workers, per_study), 180, warmed)
        warm_studies = set(study_latencies(url))
        *_, warm_analyses = analysis_span(url)

        load_before = os.getloadavg()[0]
        started = time.monotonic()
        _push(running, files, senders, per_study)
        pushed = time.monotonic()
        wait_until(
            lambda: everything_delivered(running, workers + studies, per_study),
            120 + 2 * n,
            f"every study of the {kind} site assessed and delivered",
        )
        finished = time.monotonic()
        analysed, span, _ = analysis_span(url, after_id=warm_analyses)
        latencies = [s for study, s in study_latencies(url).items() if study not in warm_studies]
        figures = Figures(
            kind,
            n,
            studies,
            pushed - started,
            (analysed - 1) / span if span > 0 else math.nan,
            finished - started,
            latencies,
            _peaks(running),
            (load_before, os.getloadavg()[0]),
        )
    return figures


def _push(running: RunningSite, files: list[Path], senders: int, per_study: int) -> None:
    for run in push(running.site.port, files, senders, per_study):
        if run.returncode != 0 or run.refused or len(run.acknowledged) != len(run.sent):
            raise RuntimeError(f"storescu did not get every instance stored:\n{run.output[-2000:]}")


def _peaks(running: RunningSite) -> dict[str, int]:
    peaks = {role: peak_rss(pid) for role, pid in running.processes().items()}
    found = {role: peak for role, peak in peaks.items() if peak is not None}
    if running.kind == "multi-process":
        backends = [peak_rss(pid) for pid in postgres_backends(running.site.catalog_url)]
        found["postgresql backends (sum)"] = sum(peak for peak in backends if peak is not None)
    return found


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_benchmark(n: int, per_study: int, senders: int, workers: int, workdir: Path) -> dict[Kind, Figures]:
    bundle = tiny_bundle(workdir / "cnn4.bundle")
    return {kind: measure(kind, n, per_study, senders, workers, workdir, bundle) for kind in KINDS}


def report(figures: dict[Kind, Figures]) -> str:
    embedded, multi = figures["embedded"], figures["multi-process"]
    rows: list[tuple[str, float, float]] = [
        ("ingest (instances/s)", embedded.ingest_rate, multi.ingest_rate),
        ("analysis (analyses/s)", embedded.analysis_rate, multi.analysis_rate),
        ("first instance -> all delivered (s)", embedded.everything_seconds, multi.everything_seconds),
        ("study latency p50 (s)", percentile(embedded.latencies, 50), percentile(multi.latencies, 50)),
        ("study latency p99 (s)", percentile(embedded.latencies, 99), percentile(multi.latencies, 99)),
    ]
    lines = [f"{'':38} {'embedded':>10} {'multi-process':>14} {'ratio m/e':>10}"]
    lines += [f"{name:38} {e:10.2f} {m:14.2f} {m / e:10.2f}" for name, e, m in rows]
    lines.append("")
    lines.append(f"{'peak RSS (MiB)':38} {'embedded':>10} {'multi-process':>14}")
    roles = list(dict.fromkeys([*embedded.peak_rss, *multi.peak_rss]))
    for role in roles:
        lines.append(
            f"{role:38} {_mib(embedded.peak_rss.get(role)):>10} {_mib(multi.peak_rss.get(role)):>14}"
        )
    totals = (sum(embedded.peak_rss.values()), sum(multi.peak_rss.values()))
    lines.append(f"{'all processes':38} {_mib(totals[0]):>10} {_mib(totals[1]):>14}")
    lines.append("")
    lines.append(
        "load average (1 min) before -> after: "
        + ", ".join(f"{f.kind} {f.load[0]:.1f} -> {f.load[1]:.1f}" for f in (embedded, multi))
    )
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="instances pushed")
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu processes")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the multi-process site")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-topology-") as scratch:
        figures = run_benchmark(args.n, args.per_study, args.senders, args.workers, Path(scratch))
    print(
        f"{args.n} instances in {figures['embedded'].studies} studies, {args.senders} senders, "
        f"cnn4 at 64 px with Grad-CAM; multi-process with {args.workers} workers, "
        f"{os.cpu_count()} cores"
    )
    print(report(figures))


if __name__ == "__main__":
    main()
