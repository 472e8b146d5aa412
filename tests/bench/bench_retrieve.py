"""Retrieve benchmark: a C-MOVE from Precedent against DCMTK's storescu sending the same
files, both into a fresh DCMTK storescp.

Run on demand (not a timed test; CI runs it only at a tiny size, see
``test_bench_retrieve_smoke.py``)::

    python -m tests.bench.bench_retrieve --n 1000 [--repeat 3] [--catalog sqlite|postgresql]

How it is built:

* The load is the ingest benchmark's: N copies, each a new instance, of a real ~486 KB
  uncompressed ultrasound image, in studies of 50 (``bench_ingest.prepare_files``, same
  cache), read once before timing so that every run sends from the page cache.
* Precedent runs as ``precedent serve`` in its own process, as a site runs it. It is sent
  the N files once, before any timing; its one destination is the storescp's port.
* Each round starts a fresh storescp (``+xa``, max PDU 131072 as the node's, writing
  every file; ``tests.support.peers.storescp``) per
  peer, on that same port, and times, wall clock: storescu sending the N files in one
  association (the baseline), and movescu asking Precedent to move all N in one C-MOVE
  (Study Root, STUDY level, listing every study) until movescu has the final response.
  Both include association set-up and release; the C-MOVE also its own association, the
  catalog query and one Pending response per instance.
* Rounds alternate which peer goes first, so that drift falls on both alike; the table
  reports medians and the median of the per-round ratios.
* Every DCMTK process gets ``TCP_NODELAY=1`` (see ``tests.support.dcmtk``).

Precedent sends each file as stored (the storescp accepts its syntax): the data set is
streamed from disk undecoded, as storescu reads and sends it.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from pydicom import dcmread

from tests.bench.bench_ingest import (
    _CACHE_ROOT,
    MAX_PDU,
    SOURCE,
    CatalogKind,
    catalog_database,
    node_config,
    prepare_files,
    push,
    warm_page_cache,
)
from tests.support.dcmtk import movescu
from tests.support.nodes import NodeProcess, free_port, write_config
from tests.support.peers import storescp

Peer = Literal["storescu", "precedent"]
DESTINATION_AE = "BENCHSCP"


@dataclass
class Run:
    """One timed transfer of the N instances into a storescp."""

    peer: Peer
    instances: int
    seconds: float
    received: int  # files the storescp wrote
    failures: list[str]

    @property
    def instances_per_second(self) -> float:
        return self.received / self.seconds

    @property
    def complete(self) -> bool:
        return self.received == self.instances and not self.failures


def run_storescu(files: Sequence[Path], port: int, workdir: Path) -> Run:
    with storescp(port, workdir / "received") as received:
        sent = push(port, files, 1, workdir / "sender")
        count = sum(1 for _ in received.iterdir())
    return Run("storescu", len(files), sent.seconds, count, sent.failures)


def run_precedent(node_port: int, studies: Sequence[str], n: int, port: int, workdir: Path) -> Run:
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(studies)]
    failures: list[str] = []
    with storescp(port, workdir / "received") as received:
        started = time.perf_counter()
        run = movescu(node_port, keys, DESTINATION_AE, calling="BENCHMOVE", timeout=3600)
        seconds = time.perf_counter() - started
        count = sum(1 for _ in received.iterdir())
    if run.final != "Success":
        failures.append(f"movescu: final status {run.final!r}: {run.output[-500:]}")
    return Run("precedent", n, seconds, count, failures)


@contextlib.contextmanager
def loaded_node(
    files: Sequence[Path], destination_port: int, workdir: Path, catalog: CatalogKind
) -> Iterator[int]:
    """``precedent serve`` holding ``files``, its one destination on ``destination_port``;
    yields its port."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    with catalog_database(catalog, data_dir) as url:
        port = free_port()
        destination = (
            f'[[destinations]]\nname = "bench"\nae_title = "{DESTINATION_AE}"\n'
            f'host = "127.0.0.1"\nport = {destination_port}\n'
        )
        config = write_config(workdir / "precedent.toml", node_config(data_dir, port, url) + destination)
        node = NodeProcess(config, workdir / "precedent.log")
        node.start()
        try:
            loaded = push(port, files, 1, workdir / "load")
            if loaded.acknowledged != len(files):
                raise RuntimeError(f"the node acknowledged {loaded.acknowledged} of {len(files)} files")
            yield port
            node.signal(signal.SIGTERM)
            node.wait(60)
        finally:
            node.kill()


@dataclass
class Round:
    storescu: Run
    precedent: Run

    @property
    def ratio(self) -> float:
        baseline = self.storescu.instances_per_second
        return self.precedent.instances_per_second / baseline if baseline else float("nan")


@dataclass
class BenchResult:
    n: int
    catalog: CatalogKind
    file_bytes: int
    rounds: list[Round]

    def median_rate(self, peer: Peer) -> float:
        return statistics.median(getattr(r, peer).instances_per_second for r in self.rounds)

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios: each round's two runs are adjacent in time."""
        return statistics.median(r.ratio for r in self.rounds)

    @property
    def complete(self) -> bool:
        return all(r.storescu.complete and r.precedent.complete for r in self.rounds)

    def table(self) -> str:
        size_mb = self.file_bytes / 1e6
        lines = [
            f"retrieve: {self.n} x {self.file_bytes / self.n / 1e3:.0f} KB ({SOURCE.name}) into storescp, "
            f"catalog={self.catalog}, rounds={len(self.rounds)}, max PDU {MAX_PDU}",
            f"{'peer':<10} {'inst/s':>8} {'MB/s':>8} {'received':>10}",
        ]
        for peer in ("storescu", "precedent"):
            rate = self.median_rate(peer)
            received = min(getattr(r, peer).received for r in self.rounds)
            lines.append(f"{peer:<10} {rate:8.1f} {rate * size_mb / self.n:8.1f} {received:>5}/{self.n}")
        lines.append(f"ratio precedent/storescu: {self.ratio:.3f}")
        for index, r in enumerate(self.rounds, 1):
            lines.append(
                f"  round {index}: storescu {r.storescu.instances_per_second:.1f} inst/s, "
                f"precedent C-MOVE {r.precedent.instances_per_second:.1f} inst/s, ratio {r.ratio:.3f}"
            )
        if not self.complete:
            lines.append("WARNING: some instances did not arrive; see the logs")
            lines += [
                f"  {failure}"
                for r in self.rounds
                for failure in (*r.storescu.failures, *r.precedent.failures)
            ]
        return "\n".join(lines)


def run_benchmark(
    n: int,
    catalog: CatalogKind = "sqlite",
    repeat: int = 3,
    *,
    workdir: Path | None = None,
    cache_root: Path = _CACHE_ROOT,
    out: TextIO = sys.stdout,
) -> BenchResult:
    """Run ``repeat`` rounds of (storescu, Precedent's C-MOVE), alternating which goes first,
    print the table to ``out`` and return the figures."""
    files = prepare_files(n, cache_root)
    file_bytes = warm_page_cache(files)
    studies = sorted({str(dcmread(path, stop_before_pixels=True).StudyInstanceUID) for path in files})
    destination_port = free_port()
    rounds: list[Round] = []
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-retrieve-")))
        node_port = stack.enter_context(loaded_node(files, destination_port, root / "node", catalog))
        for index in range(repeat):
            order: tuple[Peer, Peer] = ("precedent", "storescu") if index % 2 else ("storescu", "precedent")
            runs: dict[Peer, Run] = {}
            for peer in order:
                run_dir = root / f"round-{index + 1}-{peer}"
                if peer == "storescu":
                    runs[peer] = run_storescu(files, destination_port, run_dir)
                else:
                    runs[peer] = run_precedent(node_port, studies, n, destination_port, run_dir)
                shutil.rmtree(run_dir / "received", ignore_errors=True)  # counted; keep the logs
                print(
                    f"round {index + 1} {peer}: {runs[peer].instances_per_second:.1f} inst/s", file=sys.stderr
                )
            rounds.append(Round(runs["storescu"], runs["precedent"]))
    result = BenchResult(n, catalog, file_bytes, rounds)
    print(result.table(), file=out, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1000, help="instances moved per run (default 1000)")
    parser.add_argument("--catalog", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (storescu, precedent)")
    parser.add_argument("--workdir", type=Path, help="a new directory for the runs' logs (default: temp)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        parser.error("--n and --repeat must be at least 1")
    result = run_benchmark(args.n, args.catalog, args.repeat, workdir=args.workdir)
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
