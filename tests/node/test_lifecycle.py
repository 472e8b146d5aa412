"""`precedent serve` as a site runs it: started, stopped, killed and started again.

The promise under test is the node's one invariant: whatever a modality was told is
stored, is stored. A graceful stop (SIGTERM) lets associations in flight finish; a
crash (kill -9) at any moment may lose what was never acknowledged, never what was.
Every node here is a real process, and every peer that pushes is DCMTK's storescu.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from node.catalog.models import Instance
from tests.support.data import content, ultrasound_file
from tests.support.dcmtk import DCMTK_ENV, StoreRun, dcmtk, echoscu, parse_storescu_log, storescu
from tests.support.nodes import NodeProcess, free_port, run_precedent, write_config
from tests.support.waiting import wait_until
from tests.support.wire import idle_association

PUSH_SIZE = 300  # instances in the batch a modality pushes; ~5 s of storescu on loopback
STUDIES = 3  # the batch spans a few studies, as a day's worklist does
CONFIG_EXIT = 2


# --- the batch a modality pushes -----------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Copies of a real ultrasound image, each its own instance, and their UIDs."""

    files: list[Path]
    uid_of: dict[Path, str]

    def uids(self, files: list[Path] | None = None) -> set[str]:
        return {self.uid_of[f] for f in (self.files if files is None else files)}


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    """Written once per module (the tests only read these files), removed after it."""
    directory = tmp_path_factory.mktemp("push")
    dataset = dcmread(ultrasound_file())
    studies = [(generate_uid(), generate_uid()) for _ in range(STUDIES)]
    files: list[Path] = []
    uid_of: dict[Path, str] = {}
    for index in range(PUSH_SIZE):
        study_uid, series_uid = studies[index % STUDIES]
        instance_uid = generate_uid()
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = instance_uid
        dataset.file_meta.MediaStorageSOPInstanceUID = instance_uid
        dataset.InstanceNumber = index // STUDIES + 1
        path = directory / f"us{index:03d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
        uid_of[path] = instance_uid
    yield Batch(files, uid_of)
    shutil.rmtree(directory, ignore_errors=True)


# --- a site: one configuration, started as often as a test needs ----------------------------


def toml_table(name: str, values: dict[str, Any]) -> str:
    """JSON scalars, strings and arrays are valid TOML values."""
    return f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


@dataclass
class Site:
    """A node's configuration file and data directory, and every process run on them."""

    config: Path
    port: int
    data_dir: Path
    catalog_url: str
    log: Path
    processes: list[NodeProcess] = field(default_factory=list)

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def objects_dir(self) -> Path:
        return self.data_dir / "objects"

    def start(self) -> NodeProcess:
        process = NodeProcess(self.config, self.log)
        self.processes.append(process)
        process.start()
        return process

    def catalog(self) -> dict[str, tuple[str, int]]:
        """SOP Instance UID → (file path, file size) for every instance the catalog records."""
        engine = create_engine(self.catalog_url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                rows = connection.execute(
                    select(Instance.sop_instance_uid, Instance.file_path, Instance.file_size)
                ).all()
        finally:
            engine.dispose()
        return {uid: (path, size) for uid, path, size in rows}

    def object_files(self) -> set[str]:
        return {p.relative_to(self.data_dir).as_posix() for p in self.objects_dir.rglob("*") if p.is_file()}


@pytest.fixture
def make_site(
    request: pytest.FixtureRequest, tmp_path: Path, catalog_url: str
) -> Iterator[Callable[..., Site]]:
    """``make_site(**dicom)``: a site on the parametrized catalog; its processes die with the test.

    A passing test's data directory (up to ~270 MB of images) is removed; a failing
    one's is kept, with the node's log, to be looked at.
    """
    sites: list[Site] = []
    failures_before = request.session.testsfailed

    def make(**dicom: Any) -> Site:
        port = free_port()
        data_dir = tmp_path / "data"
        text = toml_table("dicom", {"bind": "127.0.0.1", "port": port, **dicom})
        text += toml_table("storage", {"data_dir": str(data_dir), "min_free_bytes": 0})
        text += toml_table("catalog", {"url": catalog_url})
        config = write_config(tmp_path / "precedent.toml", text)
        site = Site(config, port, data_dir.resolve(), catalog_url, tmp_path / "node.log")
        sites.append(site)
        return site

    yield make
    for site in sites:
        for process in site.processes:
            process.kill()
    if request.session.testsfailed == failures_before:
        for site in sites:
            shutil.rmtree(site.data_dir, ignore_errors=True)


def check_holdings(site: Site, batch: Batch) -> set[str]:
    """Every catalog row has its file, whole, holding exactly the data set that was sent.

    Returns the UIDs the catalog records.
    """
    recorded = site.catalog()
    sent = {uid: path for path, uid in batch.uid_of.items()}
    for uid, (relative, size) in recorded.items():
        path = site.data_dir / relative
        assert path.is_file(), f"catalog row {uid} has no file {relative}"
        assert path.stat().st_size == size, f"{relative} is not the size the catalog recorded"
        assert content(dcmread(path)) == content(dcmread(sent[uid])), f"{relative} differs"
    return set(recorded)


# --- storescu in the background -------------------------------------------------------------


class StorePush:
    """storescu pushing files in one association while the test does other things.

    Its verbose log is read as it is written, so the test can act at a chosen point of
    the push (after so many acknowledgements), and parsed as usual once it has ended.
    """

    def __init__(self, port: int, files: list[Path], calling: str = "MODALITY") -> None:
        command = [dcmtk("storescu"), "-v", "-nh", "-R", "-aet", calling, "-aec", "PRECEDENT"]
        self.process = subprocess.Popen(
            [*command, "127.0.0.1", str(port), *map(str, files)],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines: list[str] = []
        self._acknowledged = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)
            if "Received Store Response (Success)" in line:
                self._acknowledged += 1

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_acknowledged(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self._acknowledged < count:
            if not self.running() and not self._reader.is_alive():
                raise AssertionError(
                    f"storescu ended after {self._acknowledged} acknowledgements:\n{self.log}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self._acknowledged} of {count} acknowledged in {timeout} s")
            time.sleep(0.005)

    def finish(self, timeout: float = 120) -> StoreRun:
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        return parse_storescu_log(returncode, self.log)

    @property
    def log(self) -> str:
        return "".join(self._lines)

    def stop(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def push() -> Iterator[Callable[..., StorePush]]:
    pushes: list[StorePush] = []

    def start(port: int, files: list[Path]) -> StorePush:
        pushes.append(StorePush(port, files))
        return pushes[-1]

    yield start
    for started in pushes:
        started.stop()


# --- kill -9 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kill_after",
    [1, PUSH_SIZE // 3, 2 * PUSH_SIZE // 3],
    ids=["after-the-first", "a-third-in", "two-thirds-in"],
)
def test_kill_9_during_a_push_loses_nothing_that_was_acknowledged(
    make_site: Callable[..., Site], batch: Batch, push: Callable[..., StorePush], kill_after: int
) -> None:
    site = make_site()
    node = site.start()
    pushing = push(site.port, batch.files)
    pushing.wait_for_acknowledged(kill_after)
    # Jitter the kill across the next few stores (receiving, fsync, rename, commit,
    # response): which of these steps it interrupts must not matter.
    delay = random.uniform(0, 0.05)
    time.sleep(delay)
    assert pushing.running(), "storescu ended before the kill; the test proved nothing"
    node.kill()
    told = pushing.finish()
    acknowledged = batch.uids(told.acknowledged)
    context = f"killed {delay:.3f} s after {kill_after} acknowledgements; {len(acknowledged)} in all"
    assert kill_after <= len(acknowledged) < PUSH_SIZE, context

    site.start()

    assert not any(site.incoming_dir.iterdir()), "start-up left partial files in incoming/"
    # The catalog may hold more than storescu was told (killed between commit and
    # response), never less; and what it holds is whole.
    held = check_holdings(site, batch)
    assert acknowledged <= held, f"{context}; lost: {sorted(acknowledged - held)[:5]}"

    # The modality sends again what it was not told was stored; all of it is taken.
    rest = [f for f in batch.files if batch.uid_of[f] not in acknowledged]
    resent = storescu(site.port, rest, calling="MODALITY")
    assert sorted(resent.acknowledged) == sorted(rest), resent.output[-3000:]
    assert check_holdings(site, batch) == batch.uids()
    # A file placed but not recorded before the kill was overwritten by its resend:
    # nothing on disk is unaccounted for.
    assert site.object_files() == {relative for relative, _ in site.catalog().values()}
    assert not any(site.incoming_dir.iterdir())


# --- SIGTERM ------------------------------------------------------------------------------


def test_sigterm_refuses_new_associations_and_lets_those_in_flight_finish(
    make_site: Callable[..., Site], batch: Batch, push: Callable[..., StorePush]
) -> None:
    """An idle association opened before the signal keeps the node draining for as long as
    the test needs to probe it, however fast storescu happens to be."""
    files = batch.files[:100]
    site = make_site(shutdown_timeout=60)
    node = site.start()
    with idle_association(site.port) as idle:
        pushing = push(site.port, files)
        pushing.wait_for_acknowledged(5)
        assert pushing.running()
        node.signal(signal.SIGTERM)

        wait_until(lambda: echoscu(site.port).returncode != 0, 10, "new associations are refused")
        assert "Connection refused" in str(echoscu(site.port).stderr)

        told = pushing.finish()
        assert told.returncode == 0, told.output[-3000:]
        assert sorted(told.acknowledged) == sorted(files), told.output[-3000:]
        # Still waiting for the idle association, and still serving it.
        assert node.process is not None and node.process.poll() is None
        assert idle.send_c_echo().Status == 0x0000
        idle.release()

        assert node.wait(60) == 0
    assert set(site.catalog()) == batch.uids(files)
    check_holdings(site, batch)


def test_sigterm_aborts_what_is_still_open_after_the_shutdown_timeout(make_site: Callable[..., Site]) -> None:
    site = make_site(shutdown_timeout=1)
    node = site.start()
    with idle_association(site.port) as idle:
        signalled = time.monotonic()
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 0
        took = time.monotonic() - signalled
        wait_until(lambda: not idle.is_established, 10, "the peer sees its association end")
        assert idle.is_aborted
    # It gave the peer its grace period, and then did not wait for the peer's own timeouts
    # (DIMSE 60 s, network 120 s by default).
    assert 0.9 <= took < 20, took


# --- start-up -----------------------------------------------------------------------------


def digests(directory: Path) -> dict[str, tuple[str, int]]:
    """Each file under ``directory``: its content digest and modification time."""
    return {
        p.relative_to(directory).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_start_up_purges_partial_files_from_incoming_and_leaves_objects_alone(
    make_site: Callable[..., Site], batch: Batch
) -> None:
    site = make_site()
    node = site.start()
    stored = storescu(site.port, batch.files[:3], calling="MODALITY")
    assert len(stored.acknowledged) == 3, stored.output
    node.signal(signal.SIGTERM)
    assert node.wait(60) == 0
    objects_before = digests(site.objects_dir)
    assert len(objects_before) == 3

    # What a crash leaves behind: files pynetdicom was still receiving.
    whole = batch.files[3].read_bytes()
    (site.incoming_dir / "tmpa1b2c3d4.dcm").write_bytes(whole[: len(whole) // 2])
    (site.incoming_dir / "tmpe5f6g7h8.dcm").write_bytes(b"")
    (site.incoming_dir / "tmpi9j0k1l2.dcm").write_bytes(whole)  # complete, but never acknowledged

    node = site.start()

    assert not any(site.incoming_dir.iterdir())
    assert digests(site.objects_dir) == objects_before
    assert set(site.catalog()) == batch.uids(batch.files[:3])
    assert "removed 3 partially received files" in site.log.read_text()
    assert echoscu(site.port).returncode == 0
    node.signal(signal.SIGTERM)
    assert node.wait(60) == 0


# --- configuration errors -----------------------------------------------------------------


def serve(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`precedent serve` as a site would start it, with no PRECEDENT_* variables set."""
    return run_precedent("serve", "--config", str(config), cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        pytest.param('[dicom]\nport = "abc"\n', "dicom.port", id="port-not-a-number"),
        pytest.param("[dicom]\nport = 70000\n", "dicom.port", id="port-out-of-range"),
        pytest.param("[dicom]\nprot = 104\n", "dicom.prot", id="unknown-key"),
        pytest.param('[dicom]\nae_title = "SEVENTEEN_LETTERS"\n', "dicom.ae_title", id="long-ae-title"),
        pytest.param(
            '[dicom]\nallowed_calling_aets = ["US@nowhere"]\n', "dicom.allowed_calling_aets", id="bad-host"
        ),
        pytest.param('[storage]\non_duplicate = "overwrite"\n', "storage.on_duplicate", id="bad-choice"),
        pytest.param(
            '[storage]\ndata_dir = "data"\n[catalog]\nurl = "nonsense"\n', "catalog.url", id="bad-catalog-url"
        ),
    ],
)
def test_a_configuration_error_stops_serve_with_exit_code_2_naming_the_key(
    tmp_path: Path, toml: str, key: str
) -> None:
    done = serve(write_config(tmp_path / "precedent.toml", toml), tmp_path)
    assert done.returncode == CONFIG_EXIT, done.stderr
    assert key in done.stderr, done.stderr
    assert "ready" not in done.stdout


def test_a_missing_configuration_file_stops_serve_with_exit_code_2_naming_it(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    done = serve(absent, tmp_path)
    assert done.returncode == CONFIG_EXIT, done.stderr
    assert f"{absent} does not exist" in done.stderr
    assert not list(tmp_path.iterdir()), "nothing may be created when the configuration is unreadable"
