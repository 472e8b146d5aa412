"""The audit trail: who stored, queried or retrieved what, when, and every admin command.

A real ``precedent serve`` at INFO is stored to, queried and retrieved from by DCMTK's
tools, with patients whose names are unique markers; one peer is refused a store, one is
refused the association. The trail is then read back as an administrator reads it, with
``precedent audit``, and the node's log is searched for the markers: it must name UIDs,
never patients. PostgreSQL, a catalog outage, the queue's bound and the exports' filters
each get their own test.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from node.catalog.audit import COLUMNS, AuditRecord, AuditTrail, moment, write_csv
from node.catalog.models import AUDIT_EVENTS, Instance
from node.catalog.recording import Catalog
from node.observe import EdgeEvent
from node.settings import AuditSettings
from tests.support.data import ultrasound_file
from tests.support.dcmtk import echoscu, findscu, getscu, movescu, storescu
from tests.support.nodes import NodeProcess, RunningNode, free_port, run_precedent, write_config
from tests.support.peers import storescp
from tests.support.postgres import SERVER, scratch_database
from tests.support.waiting import wait_until

MARKER = "ZZMARKER"  # in every PatientName sent: must never reach the node's log
DOCTOR = "ZZDOCTOR"  # in every ReferringPhysicianName sent: neither
PATIENT_NAME = f"{MARKER}^JANE"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
NOT_AUTHORIZED = 0x0124
CONFIG_EXIT = 2


# --- a site that was stored to, queried and retrieved from --------------------------------------


@dataclass
class Site:
    config: Path
    log: Path
    catalog_url: str
    study_uid: str
    instance_uids: set[str]
    tools: dict[str, Any]  # what each DCMTK peer saw, to check the trail against

    def audit(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_precedent("audit", "--config", str(self.config), *args)

    def exported(self, *args: str) -> list[dict[str, Any]]:
        done = self.audit("--since", "1d", "--format", "json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]


def marker_instances(directory: Path, n: int) -> tuple[str, list[Path]]:
    """``n`` copies of a real ultrasound image in one new study of patient ZZMARKER^JANE."""
    directory.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for index in range(n):
        dataset = dcmread(ultrasound_file())
        dataset.PatientName = PATIENT_NAME
        dataset.PatientID = "ZZ-AUDIT-1"
        dataset.ReferringPhysicianName = f"{DOCTOR}^WHO"
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        files.append(directory / f"{index}.dcm")
        dataset.save_as(files[-1])
    return study, files


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A node that only STORESCU, FINDSCU, MOVESCU, GETSCU and VIEWER may reach (VIEWER may
    not store), its one destination SINK a DCMTK storescp, and what each peer did to it;
    the node has been stopped (SIGTERM) when the tests read its trail."""
    base = tmp_path_factory.mktemp("audit")
    port, sink_port = free_port(), free_port()
    catalog_url = f"sqlite:///{base / 'catalog.sqlite3'}"
    config = write_config(
        base / "precedent.toml",
        f"""
[dicom]
bind = "127.0.0.1"
port = {port}
allowed_calling_aets = ["STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "VIEWER"]
permissions = {{ VIEWER = ["query", "retrieve"] }}
[storage]
data_dir = "{base / "data"}"
min_free_bytes = 0
[catalog]
url = "{catalog_url}"
[logging]
level = "INFO"
[audit]
flush_seconds = 0.1
[[destinations]]
name = "sink"
ae_title = "SINK"
host = "127.0.0.1"
port = {sink_port}
results = false
""",
    )
    study, files = marker_instances(base / "sent", 2)
    node = NodeProcess(config, base / "node.log")
    tools: dict[str, Any] = {}
    with storescp(sink_port, base / "sink"):
        node.start()
        try:
            tools["store"] = storescu(port, files)
            tools["refused store"] = storescu(port, files[:1], calling="VIEWER")
            tools["intruder"] = echoscu(port, calling="INTRUDER")
            tools["find"] = findscu(
                port,
                [
                    "QueryRetrieveLevel=STUDY",
                    f"PatientName={PATIENT_NAME}",
                    f"ReferringPhysicianName={DOCTOR}*",
                    "PatientID",
                    "StudyInstanceUID",
                ],
                base / "found",
            )
            tools["refused find"] = findscu(
                port, ["QueryRetrieveLevel=STUDY", f"PatientName={PATIENT_NAME}\\{MARKER}^JOHN"], base / "x"
            )
            tools["similar"] = findscu(
                port,
                ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", f"PatientName={PATIENT_NAME}"],
                base / "similar",
                called="PRECEDENT_SIM",
            )
            keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"]
            tools["move"] = movescu(port, keys, "SINK")
            tools["get"] = getscu(port, keys, base / "got")
            node.signal(signal.SIGTERM)
            assert node.wait(60) == 0
        finally:
            node.kill()
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    yield Site(config, base / "node.log", catalog_url, study, uids, tools)


def test_the_peers_did_what_the_trail_is_checked_against(site: Site) -> None:
    tools = site.tools
    assert len(tools["store"].acknowledged) == 2, tools["store"].output[-2000:]
    assert len(tools["refused store"].refused) == 1, tools["refused store"].output[-2000:]
    assert tools["intruder"].returncode != 0
    assert len(tools["find"].responses) == 1, tools["find"].output[-2000:]
    assert str(tools["find"].responses[0].PatientName) == PATIENT_NAME  # the names did travel
    assert tools["refused find"].responses == []
    assert tools["move"].final == "Success", tools["move"].output[-2000:]
    assert len(tools["get"].files) == 2, tools["get"].output[-2000:]


def test_a_store_is_recorded_with_who_from_where_what_and_its_size(site: Site) -> None:
    stores = site.exported("--action", "store", "--calling-ae", "STORESCU")
    assert {row["subject"]["SOPInstanceUID"] for row in stores} == site.instance_uids
    sizes = catalogued_sizes(site.catalog_url)
    for row in stores:
        assert (row["actor"], row["called_ae"], row["address"]) == ("dicom", "PRECEDENT", "127.0.0.1")
        assert (row["status"], row["outcome"], row["reason"]) == (0, "success", "")
        assert row["subject"]["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image
        assert row["size"] == sizes[row["subject"]["SOPInstanceUID"]] > 900_000
        assert row["host"] == os.uname().nodename
        assert datetime.now(UTC) - datetime.fromisoformat(row["at"]) < timedelta(minutes=10)


def test_a_refused_store_and_a_rejected_association_are_recorded(site: Site) -> None:
    (refused,) = site.exported("--action", "store", "--calling-ae", "VIEWER")
    assert (refused["status"], refused["outcome"]) == (NOT_AUTHORIZED, "failure")
    assert "dicom.permissions" in refused["reason"]
    assert refused["subject"]["SOPInstanceUID"] in site.instance_uids
    (rejected,) = site.exported("--action", "associate")
    assert (rejected["calling_ae"], rejected["called_ae"]) == ("INTRUDER", "PRECEDENT")
    assert (rejected["outcome"], rejected["address"]) == ("rejected", "127.0.0.1")
    assert rejected["reason"] == "calling AE title not allowed"


def test_queries_are_recorded_with_their_keys_and_matches_but_no_names(site: Site) -> None:
    answered, refused = site.exported("--action", "find")
    assert (answered["calling_ae"], answered["outcome"], answered["count"]) == ("FINDSCU", "success", 1)
    assert answered["subject"] == {"SOPClassUID": STUDY_ROOT_FIND, "QueryRetrieveLevel": "STUDY"}
    assert (refused["outcome"], refused["count"]) == ("failure", 0)
    assert "PatientName holds several values" in refused["reason"]
    (similar,) = site.exported("--action", "similar")
    assert (similar["called_ae"], similar["outcome"]) == ("PRECEDENT_SIM", "failure")
    assert similar["subject"]["StudyInstanceUID"] == site.study_uid
    assert "similarity search is off" in similar["reason"]


def test_retrievals_are_recorded_with_what_and_how_many(site: Site) -> None:
    (move,) = site.exported("--action", "move")
    assert (move["calling_ae"], move["outcome"], move["count"]) == ("MOVESCU", "success", 2)
    assert move["subject"]["MoveDestination"] == "SINK"
    assert move["subject"]["StudyInstanceUID"] == site.study_uid
    (get,) = site.exported("--action", "get")
    assert (get["calling_ae"], get["outcome"], get["count"]) == ("GETSCU", "success", 2)
    assert get["subject"]["StudyInstanceUID"] == site.study_uid


def test_no_patient_or_physician_name_reaches_the_log_or_the_trail(site: Site) -> None:
    log = site.log.read_text()
    for uid in site.instance_uids:  # the log is at INFO and names what it did, by UID
        assert f"C-STORE {uid} from STORESCU" in log
    assert "C-FIND STUDY level from FINDSCU: 1 match(es)" in log
    assert "C-MOVE from MOVESCU to SINK" in log and "C-GET from GETSCU" in log
    assert "refused" in log and "INTRUDER" in log
    assert MARKER not in log
    assert DOCTOR not in log
    trail = site.audit("--since", "1d", "--format", "json").stdout
    assert len(trail.splitlines()) >= 9
    assert MARKER not in trail and DOCTOR not in trail


_REPORT_FOR_AN_ODD_NAME = f"""
from node.logs import configure_logging
from tests.workers.test_reports import findings, study_report
from workers.reports import build_report

configure_logging("INFO")
made = findings()
for finding in made:
    finding.source.PatientName = "{MARKER}SOLO"  # one component: highdicom finds it odd
    finding.source.ReferringPhysicianName = "{DOCTOR}SOLO"
build_report(study_report(findings=made))
print("report built")
"""


def test_a_report_on_an_odd_name_does_not_quote_it_into_the_log() -> None:
    """highdicom quotes a person name it finds odd in a Python warning, printed to the
    worker's log whatever the level; the logging set-up of every process silences it."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_FOR_AN_ODD_NAME],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report built" in done.stdout
    assert MARKER not in done.stderr and DOCTOR not in done.stderr


# --- admin commands and the export ---------------------------------------------------------------


def test_admin_commands_are_recorded_with_user_arguments_and_exit_code(site: Site) -> None:
    assert run_precedent("status", "--json", "--config", str(site.config)).returncode == 0
    failed = run_precedent("reanalyze", "--failed", "--config", str(site.config))
    assert failed.returncode == CONFIG_EXIT  # no model is configured
    status, reanalyze = [
        row for row in site.exported("--actor", "admin") if row["action"] in ("status", "reanalyze")
    ][-2:]
    user = pwd.getpwuid(os.getuid()).pw_name
    assert (status["actor"], status["user"], status["status"]) == ("admin", user, 0)
    assert status["outcome"] == "success"
    assert status["subject"] == {"config": str(site.config), "as_json": True, "catalog": site.catalog_url}
    assert (reanalyze["status"], reanalyze["outcome"]) == (CONFIG_EXIT, "failure")
    assert reanalyze["subject"]["failed"] is True
    assert "model.bundle is not set" in reanalyze["reason"]
    assert "model.bundle is not set" in failed.stderr  # the operator's message is unchanged


def test_the_export_itself_is_recorded(site: Site) -> None:
    site.audit("--since", "2h", "--action", "move")
    last = site.exported("--actor", "admin")[-1]
    assert (last["action"], last["outcome"]) == ("audit", "success")
    assert last["subject"]["action"] == "move"
    since = datetime.fromisoformat(last["subject"]["since"])
    assert abs(since - (datetime.now(UTC) - timedelta(hours=2))) < timedelta(minutes=5)


def test_csv_export_has_a_header_and_the_subject_as_json(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "trail.csv"
    done = site.audit("--since", "7d", "--actor", "dicom", "--format", "csv", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert tuple(rows[0]) == COLUMNS
    assert f"{len(rows)} events written to {out}" in done.stderr
    assert {row["action"] for row in rows} == {"associate", "store", "find", "similar", "move", "get"}
    assert [int(row["id"]) for row in rows] == sorted(int(row["id"]) for row in rows)
    stores = [row for row in rows if row["action"] == "store" and row["calling_ae"] == "STORESCU"]
    assert {json.loads(row["subject"])["SOPInstanceUID"] for row in stores} == site.instance_uids


def test_time_filters_select_what_happened_in_the_window(site: Site) -> None:
    everything = site.exported()
    wide = site.exported("--since", "2000-01-01", "--until", "2999-01-01T00:00:00+01:00")
    assert len(wide) >= len(everything)
    assert site.exported("--since", "2999-01-01") == []
    assert site.exported("--until", "2000-01-01") == []
    first_store = next(row for row in everything if row["action"] == "store")
    after = site.exported("--since", first_store["at"], "--action", "store")
    assert first_store["id"] == after[0]["id"]
    assert site.audit("--since", "1d", "--limit", "3").stdout.count("\n") == 1 + 3  # header + 3


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--since", "yesterday"], "--since"),
        (["--since", "2026-13-45"], "--since"),
        (["--since", "7d", "--until", "soon"], "--until"),
        (["--since", "7d", "--actor", "robot"], "--actor"),
        (["--since", "7d", "--format", "xml"], "--format"),
        ([], "--since"),
    ],
)
def test_bad_export_arguments_exit_2_naming_the_option(site: Site, arguments: list[str], named: str) -> None:
    done = site.audit(*arguments)
    assert done.returncode == CONFIG_EXIT
    assert named in done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr


def test_moments_are_read_in_utc() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert moment("12h", now) == datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
    assert moment("7d", now) == datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    assert moment("90m", now) == datetime(2026, 11, 30, 10, 30, tzinfo=UTC)
    assert moment("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert moment("2026-11-01T08:30:00+01:00") == datetime(2026, 11, 1, 7, 30, tzinfo=UTC)
    for bad in ("", "7", "d7", "-7d", "7 days", "99999999999d", "2026-02-30"):
        with pytest.raises(ValueError, match="ISO 8601"):
            moment(bad)


# --- PostgreSQL, outages and the bound --------------------------------------------------------------


def test_on_postgresql_events_are_written_while_the_node_runs(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    with scratch_database() as url:
        running = start_node(catalog_url=url, audit={"flush_seconds": 0.1})
        _, files = marker_instances(tmp_path / "sent", 1)
        assert len(storescu(running.port, files).acknowledged) == 1
        trail = running.node.audit
        assert trail is not None
        wait_until(lambda: any(r.action == "store" for r in trail.events()), 10, "the store is written")
        (store,) = trail.events(action="store")
        assert (store.calling_ae, store.outcome, store.status) == ("STORESCU", "success", 0)
        assert store.subject["SOPInstanceUID"] == str(dcmread(files[0]).SOPInstanceUID)
        assert store.size > 900_000

        with_password = url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
        arguments = ("audit", "--since", "1h", "--action", "store", "--format", "json")
        done = run_precedent(*arguments, PRECEDENT_CATALOG__URL=with_password)
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["subject"]["SOPInstanceUID"] for line in done.stdout.splitlines()] == [
            store.subject["SOPInstanceUID"]
        ]
        (command,) = trail.events(actor="admin")
        assert command.action == "audit"
        assert command.subject["catalog"] == make_url(with_password).render_as_string(hide_password=True)
        assert "***" in command.subject["catalog"]
        assert "s3cret" not in json.dumps(command.subject)


def edge_event(n: int) -> EdgeEvent:
    subject = {"SOPInstanceUID": f"1.2.826.0.1.3680043.10.1.{n}"}
    return EdgeEvent("store", "MODALITY", "PRECEDENT", "10.1.2.3", 0, 0.01, subject, size=1000 + n)


def written(url: str) -> int:
    catalog = Catalog.open(url)
    try:
        with catalog.connection() as connection:
            return int(connection.execute(select(func.count()).select_from(AUDIT_EVENTS)).scalar_one())
    finally:
        catalog.close()


def failing(caplog: pytest.LogCaptureFixture) -> bool:
    return any(r.levelno == logging.ERROR and "audit trail" in r.message for r in caplog.records)


def test_a_catalog_outage_delays_events_but_loses_none(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.catalog.audit")
    with scratch_database() as url:
        name = make_url(url).database
        catalog = Catalog.open(url)
        trail = AuditTrail(catalog, AuditSettings(flush_seconds=0.05), host="node-a")
        trail.start()
        try:
            trail.observe(edge_event(0))
            wait_until(lambda: trail.queued == 0, 10, "the first event is written")
            with psycopg.connect(SERVER, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
                )
                started = time.perf_counter()
                for n in range(1, 101):
                    trail.observe(edge_event(n))
                observing = time.perf_counter() - started
                wait_until(lambda: failing(caplog), 20, "the writer finds the catalog unreachable")
                assert trail.queued == 100
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            wait_until(lambda: trail.queued == 0, 30, "the writer catches up")
        finally:
            trail.stop(timeout=5)
        uids = [record.subject["SOPInstanceUID"] for record in trail.events()]
        catalog.close()
    assert observing < 0.1  # 100 events, the catalog unreachable: the edge never waited
    assert uids == [edge_event(n).subject["SOPInstanceUID"] for n in range(101)]
    assert any("written again" in r.message for r in caplog.records)


def test_beyond_the_bound_events_are_counted_warned_once_and_recorded_as_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    catalog = Catalog.open(url)
    trail = AuditTrail(catalog, AuditSettings(max_queued=3), host="node-a")  # writer not started
    with caplog.at_level(logging.WARNING, logger="node.catalog.audit"):
        for n in range(5):
            trail.observe(edge_event(n))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "audit.max_queued" in warnings[0].message
    assert (trail.queued, trail.dropped_total) == (3, 2)

    assert trail.flush() == 3
    records = list(trail.events())
    assert [r.subject.get("SOPInstanceUID") for r in records[:3]] == [
        edge_event(n).subject["SOPInstanceUID"] for n in range(3)
    ]
    dropped = records[3]
    assert (dropped.action, dropped.outcome, dropped.count) == ("dropped", "failure", 2)
    assert "audit.max_queued (3)" in dropped.reason
    assert written(url) == 4

    caplog.clear()  # a new overflow after the trail caught up is warned about again
    with caplog.at_level(logging.WARNING, logger="node.catalog.audit"):
        for n in range(5, 9):
            trail.observe(edge_event(n))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    catalog.close()


def test_stop_writes_what_waits_and_ids_are_never_reused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    catalog = Catalog.open(url)
    trail = AuditTrail(catalog, AuditSettings(flush_seconds=60), host="node-a")
    trail.start()
    for n in range(3):
        trail.observe(edge_event(n))
    assert trail.stop() is True
    assert written(url) == 3
    with catalog.transaction() as connection:
        connection.execute(AUDIT_EVENTS.delete().where(AUDIT_EVENTS.c.id == 3))
    trail.observe(edge_event(3))
    trail.flush()
    assert [r.id for r in trail.events()] == [1, 2, 4]  # AUTOINCREMENT: a deleted id stays a gap
    catalog.close()


def test_with_the_audit_off_nothing_is_recorded(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    running = start_node(audit={"enabled": False})
    assert running.node.audit is None
    _, files = marker_instances(tmp_path / "sent", 1)
    assert len(storescu(running.port, files).acknowledged) == 1
    url = running.node.settings.catalog_url()
    done = run_precedent("status", PRECEDENT_CATALOG__URL=url, PRECEDENT_AUDIT__ENABLED="false")
    assert done.returncode == 0, done.stderr
    assert written(url) == 0


def catalogued_sizes(url: str) -> dict[str, int]:
    catalog = Catalog.open(url)
    try:
        with catalog.connection() as connection:
            rows = connection.execute(select(Instance.sop_instance_uid, Instance.file_size)).all()
    finally:
        catalog.close()
    return dict(rows)


def test_csv_export_keeps_a_peers_text_from_running_as_a_spreadsheet_formula() -> None:
    """A calling AE title such as ``=HYPERLINK(...)`` is the peer's choice; opened in a
    spreadsheet, the export must show it, not run it."""
    record = AuditRecord(
        id=1,
        at=datetime(2026, 11, 23, 8, 0, tzinfo=UTC),
        host="node-1",
        actor="dicom",
        action="find",
        calling_ae="=HYPERLINK(1)",
        called_ae="PRECEDENT",
        address="127.0.0.1",
        user="",
        status=0,
        outcome="success",
        subject={"PatientID": "-1+1"},
        count=-1,
        size=0,
        reason="@SUM(A1)",
    )
    out = io.StringIO()
    write_csv([record], out)
    row = dict(zip(COLUMNS, list(csv.reader(io.StringIO(out.getvalue())))[1], strict=True))
    assert row["calling_ae"] == "'=HYPERLINK(1)"
    assert row["reason"] == "'@SUM(A1)"
    assert row["count"] == "-1"  # numbers stay numbers
    assert json.loads(row["subject"]) == {"PatientID": "-1+1"}  # JSON text starts with "{"
    assert row["called_ae"] == "PRECEDENT"
