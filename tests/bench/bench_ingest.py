"""Ingest benchmark: Precedent against DCMTK's storescp, receiving the same storescu load.

Run on demand (not a timed test; CI runs it only at a tiny size, see
``test_bench_ingest_smoke.py``)::

    python -m tests.bench.bench_ingest --n 500 --senders 1 [--catalog sqlite|postgresql] [--repeat 3]

Why it is built this way:

* The load is N copies, each with a new SOP Instance UID, of a real ~486 KB
  uncompressed ultrasound image (pydicom-data's ``OBXXXX1A.dcm``), prepared once
  and cached under the temp directory, then read once before timing so that every
  run sends from the page cache.
* The baseline is measured in the same run on the same machine: DCMTK's storescp,
  a native SCP that writes each file and answers. Runs alternate (storescp,
  Precedent, then Precedent, storescp, ...) so that machine drift falls on both
  peers alike; the table reports medians over the rounds and the median of the
  per-round ratios.
* Both peers run as their own process (``precedent serve --config``, as a site
  runs it), pushed by ``--senders`` concurrent storescu processes, one association
  each, the files split between them. Time is wall clock from the first storescu
  start to the last storescu exit, so it includes association set-up and release.
* C-STORE latency is measured by the sender, never by the receiver under test:
  storescu logs through a log4cplus configuration whose pattern carries
  microsecond timestamps, and each "Sending Store Request" is paired with the
  "Received Store Response" that follows it in the same association. It therefore
  covers the transfer of the data set and the SCP's processing up to its response.
* Every DCMTK process gets ``TCP_NODELAY=1`` (see ``tests.support.dcmtk``), and
  both SCPs offer the same maximum PDU (131072, Precedent's default), so both
  receive the same PDU stream.

Not equal by design, and worth knowing when reading the ratio: storescp neither
fsyncs nor records anything, while Precedent fsyncs each file and its directory
and commits a catalog transaction before it answers Success.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from sqlalchemy import func, select

from node.catalog.database import connect
from node.catalog.models import Instance
from tests.bench.copies import cached_copies
from tests.support.data import PYDICOM_DATA_DIR
from tests.support.dcmtk import DCMTK_ENV, dcmtk, parse_storescu_log
from tests.support.nodes import NodeProcess, free_port, write_config
from tests.support.peers import wait_for_echo
from tests.support.postgres import scratch_database

Peer = Literal["storescp", "precedent"]
CatalogKind = Literal["sqlite", "postgresql"]

# A real uncompressed ultrasound image of ~486 KB (600 x 800 palette colour, Explicit VR LE).
SOURCE = PYDICOM_DATA_DIR / "OBXXXX1A.dcm"
# Copies are grouped into studies of this many instances (one series each), as a
# modality would send them, so that the catalog sees both new and existing studies.
INSTANCES_PER_STUDY = 50
MAX_PDU = 131072
CALLED_AE = "PRECEDENT"
CALLING_AE = "BENCHSCU"
GOAL_RATIO = 0.8
_CACHE_ROOT = Path(tempfile.gettempdir()) / "precedent-bench-ingest"

# log4cplus: only storescu's INFO narrative, into a file, stamped to the microsecond
# (%Q is "milliseconds.microseconds"); buffered so that logging costs storescu little.
_STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, file
log4cplus.appender.file = log4cplus::FileAppender
log4cplus.appender.file.File = {log}
log4cplus.appender.file.Append = false
log4cplus.appender.file.ImmediateFlush = false
log4cplus.appender.file.layout = log4cplus::PatternLayout
log4cplus.appender.file.layout.ConversionPattern = %D{{%H:%M:%S.%Q}} %5p: %m%n
"""
_STAMPED = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d+)(?:\.(\d+))?\s+\w+:\s(.*)$")
_REQUEST = "Sending Store Request"
_RESPONSE = "Received Store Response"
_DAY = 86_400.0


# --- the load -------------------------------------------------------------------------------


def prepare_files(n: int, cache_root: Path = _CACHE_ROOT) -> list[Path]:
    """N copies of :data:`SOURCE`, each a new instance, cached across runs."""
    return cached_copies(SOURCE, n, cache_root, INSTANCES_PER_STUDY)


def warm_page_cache(files: Sequence[Path]) -> int:
    """Read every file once so that no run pays for a cold disk; return the total bytes."""
    total = 0
    for path in files:
        total += len(path.read_bytes())
    return total


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """Contiguous, nearly equal shares, one per sender (so each keeps its studies whole)."""
    size, extra = divmod(len(files), parts)
    shares: list[list[Path]] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        shares.append(list(files[start:end]))
        start = end
    return [share for share in shares if share]


# --- pushing and measuring --------------------------------------------------------------------


@dataclass
class Push:
    """What the storescu processes of one run did and saw."""

    seconds: float
    sent: int = 0
    acknowledged: int = 0
    refused: int = 0
    acknowledged_bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def push(port: int, files: Sequence[Path], senders: int, workdir: Path, timeout: float = 900) -> Push:
    """Send ``files`` with ``senders`` concurrent storescu processes, one association each."""
    workdir.mkdir(parents=True, exist_ok=True)
    processes: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    commands: list[list[str]] = []
    for index, share in enumerate(split(files, senders)):
        log = workdir / f"storescu-{index}.log"
        config = write_config(workdir / f"storescu-{index}.cfg", _STORESCU_LOG_CONFIG.format(log=log))
        options = ["-lc", str(config), "-nh", "-R", "-aet", CALLING_AE, "-aec", CALLED_AE]
        commands.append([dcmtk("storescu"), *options, "127.0.0.1", str(port), *map(str, share)])
    started = time.perf_counter()
    for index, command in enumerate(commands):
        stderr = workdir / f"storescu-{index}.stderr"
        with stderr.open("wb") as err:
            process = subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=err)
        processes.append((process, workdir / f"storescu-{index}.log", stderr))
    for process, _, _ in processes:
        process.wait(timeout)
    result = Push(seconds=time.perf_counter() - started)
    for process, log, stderr in processes:
        text = log.read_text(errors="replace") if log.exists() else ""
        run = parse_storescu_log(process.returncode, text)
        result.sent += len(run.sent)
        result.acknowledged += len(run.acknowledged)
        result.refused += len(run.refused)
        result.acknowledged_bytes += sum(path.stat().st_size for path in run.acknowledged)
        result.latencies += store_latencies(text)
        if process.returncode != 0:
            result.failures.append(f"storescu exit {process.returncode}: {stderr.read_text()[-500:]}")
    return result


def store_latencies(log: str) -> list[float]:
    """Seconds from each "Sending Store Request" to the next "Received Store Response"."""
    latencies: list[float] = []
    pending: float | None = None
    for line in log.splitlines():
        stamped = _STAMPED.match(line)
        if stamped is None:
            continue
        hours, minutes, seconds, millis, micros, message = stamped.groups()
        at = int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1e3
        at += int(micros) / 1e6 if micros else 0.0
        if message.startswith(_REQUEST):
            pending = at
        elif message.startswith(_RESPONSE) and pending is not None:
            latencies.append((at - pending) % _DAY)  # a push may run across midnight
            pending = None
    return latencies


# --- the two peers ----------------------------------------------------------------------------


@dataclass
class PeerRun:
    """One timed push into one peer."""

    peer: Peer
    instances: int
    push: Push
    stored: int  # files storescp wrote / instances in Precedent's catalog

    @property
    def instances_per_second(self) -> float:
        return self.push.acknowledged / self.push.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.push.acknowledged_bytes / 1e6 / self.push.seconds

    @property
    def complete(self) -> bool:
        """Every instance acknowledged and kept, and no sender failed."""
        p = self.push
        return p.acknowledged == self.instances == self.stored and not p.refused and not p.failures


def run_storescp(files: Sequence[Path], senders: int, workdir: Path) -> PeerRun:
    """DCMTK's storescp, accepting the transfer syntax as sent; forking one process per
    association when there are several senders, so that it may serve them concurrently
    as Precedent does (a plain storescp serves one association at a time)."""
    output = workdir / "received"
    output.mkdir(parents=True)
    port = free_port()
    command = [dcmtk("storescp"), "+xa", "--max-pdu", str(MAX_PDU), "-od", str(output)]
    if senders > 1:
        command.append("--fork")
    with (workdir / "storescp.log").open("wb") as log:
        process = subprocess.Popen([*command, str(port)], env=DCMTK_ENV, stdout=log, stderr=log)
    try:
        wait_for_echo(port, process)
        result = push(port, files, senders, workdir / "senders")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    stored = sum(1 for path in output.iterdir() if path.is_file())
    return PeerRun("storescp", len(files), result, stored)


def node_config(data_dir: Path, port: int, catalog_url: str) -> str:
    """The TOML a site would write; everything else is Precedent's default."""
    return "\n".join(
        [
            "[dicom]",
            'bind = "127.0.0.1"',
            f"port = {port}",
            f"max_pdu = {MAX_PDU}",
            "[storage]",
            f"data_dir = {json.dumps(str(data_dir))}",
            "min_free_bytes = 0",
            "[catalog]",
            f"url = {json.dumps(catalog_url)}",
            "",
        ]
    )


@contextlib.contextmanager
def catalog_database(catalog: CatalogKind, data_dir: Path) -> Iterator[str]:
    """A fresh catalog per run: a SQLite file in the data directory or a scratch database."""
    if catalog == "sqlite":
        yield f"sqlite:///{data_dir / 'catalog.sqlite3'}"
    else:
        with scratch_database() as url:
            yield url


def catalogued_instances(url: str) -> int:
    engine = connect(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count(Instance.id))).scalar_one())
    finally:
        engine.dispose()


def run_precedent(files: Sequence[Path], senders: int, workdir: Path, catalog: CatalogKind) -> PeerRun:
    """``precedent serve`` in its own process, started (schema migrated) before timing."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    with catalog_database(catalog, data_dir) as url:
        port = free_port()
        config = write_config(workdir / "precedent.toml", node_config(data_dir, port, url))
        node = NodeProcess(config, workdir / "precedent.log")
        node.start()
        try:
            result = push(port, files, senders, workdir / "senders")
            node.signal(signal.SIGTERM)
            if (returncode := node.wait(60)) != 0:
                result.failures.append(f"precedent serve exited with {returncode}; see {node.log}")
        finally:
            node.kill()
        stored = catalogued_instances(url)
    return PeerRun("precedent", len(files), result, stored)


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Round:
    storescp: PeerRun
    precedent: PeerRun

    @property
    def ratio(self) -> float:
        baseline = self.storescp.instances_per_second
        return self.precedent.instances_per_second / baseline if baseline else float("nan")


@dataclass
class BenchResult:
    n: int
    senders: int
    catalog: CatalogKind
    file_bytes: int
    rounds: list[Round]

    def runs(self, peer: Peer) -> list[PeerRun]:
        return [getattr(r, peer) for r in self.rounds]

    def median_rate(self, peer: Peer) -> float:
        return statistics.median(run.instances_per_second for run in self.runs(peer))

    def median_throughput(self, peer: Peer) -> float:
        return statistics.median(run.megabytes_per_second for run in self.runs(peer))

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios: each round's two runs are adjacent in time."""
        return statistics.median(r.ratio for r in self.rounds)

    def latency_ms(self, peer: Peer, quantile: float) -> float:
        """A quantile (nearest rank) of every C-STORE round trip of every round, in milliseconds."""
        latencies = sorted(x for run in self.runs(peer) for x in run.push.latencies)
        if not latencies:
            return float("nan")
        rank = min(len(latencies), max(1, math.ceil(quantile * len(latencies))))
        return latencies[rank - 1] * 1e3

    @property
    def complete(self) -> bool:
        return all(r.storescp.complete and r.precedent.complete for r in self.rounds)

    def table(self) -> str:
        size_kb = self.file_bytes / self.n / 1e3
        lines = [
            f"ingest: {self.n} x {size_kb:.0f} KB ({SOURCE.name}), senders={self.senders}, "
            f"catalog={self.catalog}, rounds={len(self.rounds)}, max PDU {MAX_PDU}"
            + (", storescp --fork" if self.senders > 1 else ""),
            f"{'peer':<10} {'inst/s':>8} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'stored':>11}",
        ]
        for peer in ("storescp", "precedent"):
            runs = self.runs(peer)
            stored = f"{min(r.stored for r in runs)}/{self.n}"
            lines.append(
                f"{peer:<10} {self.median_rate(peer):8.1f} {self.median_throughput(peer):8.1f} "
                f"{self.latency_ms(peer, 0.50):8.2f} {self.latency_ms(peer, 0.99):8.2f} {stored:>11}"
            )
        lines.append(f"ratio precedent/storescp: {self.ratio:.3f} (goal >= {GOAL_RATIO})")
        for index, r in enumerate(self.rounds, 1):
            lines.append(
                f"  round {index}: storescp {r.storescp.instances_per_second:.1f} inst/s, "
                f"precedent {r.precedent.instances_per_second:.1f} inst/s, ratio {r.ratio:.3f}"
            )
        if not self.complete:
            lines.append("WARNING: some instances were not acknowledged or not stored; see the logs")
        return "\n".join(lines)


def run_benchmark(
    n: int,
    senders: int = 1,
    catalog: CatalogKind = "sqlite",
    repeat: int = 3,
    *,
    workdir: Path | None = None,
    cache_root: Path = _CACHE_ROOT,
    out: TextIO = sys.stdout,
) -> BenchResult:
    """Run ``repeat`` rounds of (storescp, Precedent), alternating which goes first,
    print the table to ``out`` and return the figures."""
    files = prepare_files(n, cache_root)
    file_bytes = warm_page_cache(files)
    rounds: list[Round] = []
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-")))
        for index in range(repeat):
            order: tuple[Peer, Peer] = ("storescp", "precedent")
            if index % 2:
                order = ("precedent", "storescp")
            runs: dict[Peer, PeerRun] = {}
            for peer in order:
                run_dir = root / f"round-{index + 1}-{peer}"
                if peer == "storescp":
                    runs[peer] = run_storescp(files, senders, run_dir)
                else:
                    runs[peer] = run_precedent(files, senders, run_dir, catalog)
                # Received copies are not needed once counted; keep the logs for inspection.
                received = "received" if peer == "storescp" else "data/objects"
                shutil.rmtree(run_dir / received, ignore_errors=True)
                print(
                    f"round {index + 1} {peer}: {runs[peer].instances_per_second:.1f} inst/s",
                    file=sys.stderr,
                )
            rounds.append(Round(runs["storescp"], runs["precedent"]))
    result = BenchResult(n, senders, catalog, file_bytes, rounds)
    print(result.table(), file=out, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=500, help="instances per run (default 500)")
    parser.add_argument("--senders", type=int, default=1, help="concurrent storescu associations")
    parser.add_argument("--catalog", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (storescp, precedent)")
    parser.add_argument("--workdir", type=Path, help="a new directory for the runs' logs (default: temp)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.senders < 1 or args.repeat < 1:
        parser.error("--n, --senders and --repeat must be at least 1")
    result = run_benchmark(args.n, args.senders, args.catalog, args.repeat, workdir=args.workdir)
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
