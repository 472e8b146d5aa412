"""Query benchmark: C-FIND STUDY-level latency against Precedent with N studies in the
catalog, next to what the database alone takes for the same SQL.

Run on demand (not a timed test; CI runs it only at a tiny size, see
``test_bench_find_smoke.py``)::

    python -m tests.bench.bench_find --studies 100000 [--catalog sqlite|postgresql] [--queries 200]

How it is built:

* The catalog is filled directly, not through C-STORE (100k C-STOREs would take far too
  long): the schema is made by the node's own ``Catalog.open`` (Alembic migrations), then
  patients, studies, series and instances are bulk-inserted with SQLAlchemy Core into the
  node's tables (``node.catalog.models``) in one transaction. Each study has one series
  of one instance (US); each patient has ``STUDIES_PER_PATIENT`` studies. Rows are a
  deterministic function of the study's index (:func:`study_row`), so the number of
  matches of every query is known from the generation alone. PostgreSQL then gets
  ``VACUUM ANALYZE`` (what autovacuum would have done on a live catalog); SQLite gets
  nothing, as a node's catalog gets nothing.
* Three query kinds, Study Root, STUDY level, each asking for the keys a viewer's study
  list asks for (names, IDs, dates, accession, description, ``ModalitiesInStudy``,
  ``NumberOfStudyRelatedInstances``): an exact ``PatientID`` (``STUDIES_PER_PATIENT``
  matches), a wildcard ``PatientName`` (``SURNAME*``, one surname in ``SURNAMES``,
  matched case-insensitively by the node) and a ``StudyDate`` range of ``RANGE_DAYS``
  days out of ``DAYS``. Each timed query picks new values (seeded), after a few untimed
  warm-up queries.
* Precedent runs as ``precedent serve`` in its own process, as a site runs it, on the
  filled catalog. The client is a pynetdicom SCU in this process holding one association
  and sending the C-FIND requests in a loop; a query's latency is the wall clock from
  sending the request to receiving the final (Success) response, all Pending responses
  read. That is more precise than one findscu process per query, whose start-up would
  dwarf a fast query. The client's own decoding of the responses is inside the figure.
  The client's socket has ``TCP_NODELAY``, as every DCMTK peer here has; the node's does
  not (its Nagle stalls, if any, are the node's and are timed).
* Baseline, in the same run and for each query: the node's own SQL for that identifier
  (``node.query.parse_query(...).statement()``) executed on one held connection from
  this process, all rows fetched (what the database alone costs). The node's query and
  the database's alternate which goes first.
* The table reports p50 and p99 per query kind for the node and the database, and the
  ratio node/database of the p50s.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlalchemy import insert, text

from node.catalog.database import connect
from node.catalog.models import INSTANCES, PATIENTS, SERIES, STUDIES
from node.catalog.recording import Catalog
from node.query import Model, parse_query
from tests.bench.bench_ingest import CALLED_AE, MAX_PDU, CatalogKind, catalog_database, node_config
from tests.support.nodes import NodeProcess, free_port, write_config

QueryKind = Literal["patient_id", "patient_name", "study_date"]
QUERY_KINDS: tuple[QueryKind, ...] = ("patient_id", "patient_name", "study_date")
CALLING_AE = "BENCHFIND"
STUDIES_PER_PATIENT = 2
# Fixed width, so that no surname is a prefix of another: SURNAME* matches one surname only.
SURNAMES = [f"SN{k:03d}" for k in range(500)]
FIRST_DAY = date(2020, 1, 1)
DAYS = 1000
RANGE_DAYS = 5
WARM_UP = 3
_BATCH = 5000
_UID_ROOT = "1.2.826.0.1.3680043.10.99"
_US = "1.2.840.10008.5.1.4.1.1.6.1"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
# What a viewer's study list asks for; empty values are return keys.
_RETURN_KEYS = {
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "",
    "StudyTime": "",
    "AccessionNumber": "",
    "StudyDescription": "",
    "StudyInstanceUID": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedInstances": "",
}


def patient_of(study: int) -> int:
    return study // STUDIES_PER_PATIENT


def surname_of(patient: int) -> str:
    return SURNAMES[patient % len(SURNAMES)]


def day_of(study: int) -> int:
    """The study's day in [0, DAYS), scattered (7919 is prime to DAYS) so that a date range
    does not select a run of consecutive rows."""
    return (study * 7919) % DAYS


def dicom_date(day: int) -> str:
    return (FIRST_DAY + timedelta(days=day)).strftime("%Y%m%d")


def study_row(study: int) -> dict[str, Any]:
    """The keys of study ``study`` (0-based): its patient's, its own, its one series' and instance's."""
    patient = patient_of(study)
    return {
        "patient_id": f"PID{patient:07d}",
        "patient_name": f"{surname_of(patient)}^GIVEN{patient:07d}",
        "birth_date": dicom_date(patient % DAYS),
        "sex": "FM"[patient % 2],
        "study_uid": f"{_UID_ROOT}.{study + 1}",
        "study_date": dicom_date(day_of(study)),
        "accession": f"ACC{study:08d}",
    }


@dataclass(frozen=True)
class Expected:
    """How many studies each query matches, counted from the generated rows."""

    studies: int
    per_patient: Counter[int]
    per_surname: Counter[str]
    per_day: Counter[int]

    @classmethod
    def of(cls, studies: int) -> Expected:
        patients = Counter(patient_of(s) for s in range(studies))
        surnames: Counter[str] = Counter()
        for patient, count in patients.items():
            surnames[surname_of(patient)] += count
        return cls(studies, patients, surnames, Counter(day_of(s) for s in range(studies)))

    def date_range(self, first_day: int) -> int:
        return sum(self.per_day[d] for d in range(first_day, first_day + RANGE_DAYS))


def fill_catalog(url: str, studies: int) -> float:
    """Create the schema with the node's migrations and insert ``studies`` studies (one
    series, one instance each) in one transaction; return the seconds it took."""
    started = time.perf_counter()
    catalog = Catalog.open(url)
    now = datetime.now(UTC)
    try:
        with catalog.engine.begin() as connection:
            for start in range(0, studies, _BATCH):
                rows = [study_row(s) for s in range(start, min(start + _BATCH, studies))]
                indexes = range(start, start + len(rows))
                patients = [
                    {
                        "id": patient_of(s) + 1,
                        "patient_id": r["patient_id"],
                        "issuer_of_patient_id": "",
                        "patient_name": r["patient_name"],
                        "patient_birth_date": r["birth_date"],
                        "patient_sex": r["sex"],
                        "created_at": now,
                    }
                    for s, r in zip(indexes, rows, strict=True)
                    if s % STUDIES_PER_PATIENT == 0
                ]
                connection.execute(insert(PATIENTS), patients)
                connection.execute(
                    insert(STUDIES),
                    [
                        {
                            "id": s + 1,
                            "study_instance_uid": r["study_uid"],
                            "patient_pk": patient_of(s) + 1,
                            "study_date": r["study_date"],
                            "study_time": "120000",
                            "accession_number": r["accession"],
                            "study_id": "1",
                            "study_description": "BENCH STUDY",
                            "referring_physician_name": "",
                            "created_at": now,
                            "updated_at": now,
                            "assessment_due": False,
                        }
                        for s, r in zip(indexes, rows, strict=True)
                    ],
                )
                connection.execute(
                    insert(SERIES),
                    [
                        {
                            "id": s + 1,
                            "series_instance_uid": f"{r['study_uid']}.1",
                            "study_pk": s + 1,
                            "modality": "US",
                            "series_number": 1,
                            "series_description": "",
                            "body_part_examined": "",
                            "laterality": "",
                            "created_at": now,
                        }
                        for s, r in zip(indexes, rows, strict=True)
                    ],
                )
                connection.execute(
                    insert(INSTANCES),
                    [
                        {
                            "id": s + 1,
                            "sop_instance_uid": f"{r['study_uid']}.1.1",
                            "sop_class_uid": _US,
                            "series_pk": s + 1,
                            "instance_number": 1,
                            "transfer_syntax_uid": _EXPLICIT_LE,
                            "image_laterality": "",
                            "view_position": "",
                            "rows": 480,
                            "columns": 640,
                            "number_of_frames": None,
                            "file_path": f"objects/bench/{s}.dcm",
                            "file_size": 1000,
                            "calling_ae_title": "BENCH",
                            "received_at": now,
                        }
                        for s, r in zip(indexes, rows, strict=True)
                    ],
                )
        if catalog.engine.dialect.name == "postgresql":
            with catalog.engine.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    finally:
        catalog.close()
    return time.perf_counter() - started


def identifier(kind: QueryKind, value: str) -> Dataset:
    """A Study Root STUDY-level request: the viewer's return keys, one of them matched."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    keyword = {"patient_id": "PatientID", "patient_name": "PatientName", "study_date": "StudyDate"}[kind]
    for name, empty in _RETURN_KEYS.items():
        setattr(ds, name, value if name == keyword else empty)
    return ds


def pick(kind: QueryKind, expected: Expected, rng: random.Random) -> tuple[str, int]:
    """A matching value for a query of ``kind`` and the number of studies it matches."""
    if kind == "patient_id":
        patient = rng.randrange(len(expected.per_patient))
        return f"PID{patient:07d}", expected.per_patient[patient]
    if kind == "patient_name":
        surname = rng.choice(sorted(expected.per_surname))  # at a tiny size not every surname is used
        return f"{surname}*", expected.per_surname[surname]
    first = rng.randrange(DAYS - RANGE_DAYS + 1)
    return f"{dicom_date(first)}-{dicom_date(first + RANGE_DAYS - 1)}", expected.date_range(first)


def node_find(assoc: Association, request: Dataset) -> tuple[float, int, list[str]]:
    """Seconds from sending the C-FIND to its final response, Pending responses counted."""
    failures: list[str] = []
    pending = 0
    started = time.perf_counter()
    for status, _ in assoc.send_c_find(request, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            failures.append("no response (association aborted or timed out)")
        elif status.Status in (0xFF00, 0xFF01):
            pending += 1
        elif status.Status != 0x0000:
            failures.append(f"status 0x{status.Status:04X}: {status.get('ErrorComment', '')}")
    return time.perf_counter() - started, pending, failures


def database_find(connection: Any, request: Dataset) -> tuple[float, int]:
    """Seconds to run the node's SQL for ``request`` and fetch every row, and the row count."""
    statement = parse_query(request, Model.STUDY_ROOT).statement()
    started = time.perf_counter()
    rows = connection.execute(statement).all()
    return time.perf_counter() - started, len(rows)


@dataclass
class Timings:
    """One query kind's figures."""

    kind: QueryKind
    node: list[float] = field(default_factory=list)
    database: list[float] = field(default_factory=list)
    matches: list[tuple[int, int, int]] = field(default_factory=list)  # (expected, node, database)
    failures: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failures and all(e == n == d for e, n, d in self.matches)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation (``statistics.quantiles``' inclusive method)."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(q * 100) - 1]


@dataclass
class BenchResult:
    studies: int
    catalog: CatalogKind
    fill_seconds: float
    timings: dict[QueryKind, Timings]

    @property
    def complete(self) -> bool:
        return all(t.complete for t in self.timings.values())

    def table(self) -> str:
        lines = [
            f"find: {self.studies} studies (1 series, 1 instance each), catalog={self.catalog}, "
            f"filled in {self.fill_seconds:.1f} s (bulk insert), "
            f"{len(next(iter(self.timings.values())).node)} queries per kind, STUDY level",
            f"{'query':<14} {'matches':>8} {'node p50':>9} {'node p99':>9} {'db p50':>8} {'db p99':>8} "
            f"{'node/db':>8}   (ms)",
        ]
        for kind, t in self.timings.items():
            node50, node99 = quantile(t.node, 0.5) * 1e3, quantile(t.node, 0.99) * 1e3
            db50, db99 = quantile(t.database, 0.5) * 1e3, quantile(t.database, 0.99) * 1e3
            matches = statistics.median(e for e, _, _ in t.matches)
            lines.append(
                f"{kind:<14} {matches:>8.0f} {node50:9.2f} {node99:9.2f} {db50:8.2f} {db99:8.2f} "
                f"{node50 / db50 if db50 else float('nan'):8.2f}"
            )
        if not self.complete:
            lines.append("WARNING: some queries failed or returned the wrong number of matches")
            for t in self.timings.values():
                lines += [f"  {t.kind}: {failure}" for failure in t.failures[:10]]
                lines += [
                    f"  {t.kind}: expected {e}, node {n}, database {d}"
                    for e, n, d in t.matches
                    if not e == n == d
                ][:10]
        return "\n".join(lines)


@contextlib.contextmanager
def serving(url: str, workdir: Path) -> Iterator[int]:
    """``precedent serve`` on the catalog at ``url``; yields its port."""
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(workdir / "precedent.toml", node_config(data_dir, port, url))
    node = NodeProcess(config, workdir / "precedent.log")
    node.start()
    try:
        yield port
        node.signal(signal.SIGTERM)
        node.wait(60)
    finally:
        node.kill()


@contextlib.contextmanager
def association(port: int, called: str = CALLED_AE) -> Iterator[Association]:
    ae = AE(ae_title=CALLING_AE)
    ae.maximum_pdu_size = MAX_PDU
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"association with the node on port {port} was not established")
    # As every DCMTK peer here (tests.support.dcmtk): else this client's own Nagle and delayed-ACK
    # stall (~44 ms on loopback, request command and data set being separate writes) is timed too.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    try:
        yield assoc
    finally:
        assoc.release()
        ae.shutdown()


def run_benchmark(
    studies: int,
    catalog: CatalogKind = "sqlite",
    queries: int = 200,
    *,
    workdir: Path | None = None,
    seed: int = 0,
    out: TextIO = sys.stdout,
) -> BenchResult:
    """Fill a fresh catalog with ``studies`` studies, serve it, time ``queries`` queries of
    each kind through the node and on the database, print the table to ``out`` and return
    the figures."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    expected = Expected.of(studies)
    rng = random.Random(seed)
    timings = {kind: Timings(kind) for kind in QUERY_KINDS}
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-find-")))
        root.mkdir(parents=True, exist_ok=True)
        url = stack.enter_context(catalog_database(catalog, root))
        fill_seconds = fill_catalog(url, studies)
        print(f"filled {studies} studies in {fill_seconds:.1f} s", file=sys.stderr)
        port = stack.enter_context(serving(url, root))
        engine = connect(url)
        stack.callback(engine.dispose)
        connection = stack.enter_context(engine.connect())
        assoc = stack.enter_context(association(port))
        for kind in QUERY_KINDS:
            for index in range(WARM_UP + queries):
                value, count = pick(kind, expected, rng)
                request = identifier(kind, value)
                if index % 2:
                    node_seconds, node_matches, failures = node_find(assoc, request)
                    db_seconds, db_matches = database_find(connection, request)
                else:
                    db_seconds, db_matches = database_find(connection, request)
                    node_seconds, node_matches, failures = node_find(assoc, request)
                connection.rollback()  # end the read transaction, as the node's each query does
                if index < WARM_UP:
                    continue
                t = timings[kind]
                t.node.append(node_seconds)
                t.database.append(db_seconds)
                t.matches.append((count, node_matches, db_matches))
                t.failures += [f"{value}: {failure}" for failure in failures]
            print(f"{kind}: {queries} queries timed", file=sys.stderr)
    result = BenchResult(studies, catalog, fill_seconds, timings)
    print(result.table(), file=out, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--studies", type=int, default=100_000, help="studies in the catalog (default 100000)"
    )
    parser.add_argument("--catalog", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--queries", type=int, default=200, help="timed queries per kind (default 200)")
    parser.add_argument(
        "--workdir", type=Path, help="a new directory for the catalog and log (default: temp)"
    )
    args = parser.parse_args(argv)
    if args.studies < 1 or args.queries < 1:
        parser.error("--studies and --queries must be at least 1")
    result = run_benchmark(args.studies, args.catalog, args.queries, workdir=args.workdir)
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
