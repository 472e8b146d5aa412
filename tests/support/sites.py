"""A whole site in processes: `precedent serve`, `precedent worker`s, a private Redis, and
images to push; with the catalog read directly to see how the analyses stand."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.catalog.models import ANALYSES, EMBEDDINGS, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from tests.support.data import ultrasound_file
from tests.support.nodes import NodeProcess, free_port, precedent_executable, site_environment
from tests.support.waiting import wait_until


def ultrasound_studies(directory: Path, studies: int, images: int) -> list[Path]:
    """Copies of a real ultrasound image as ``studies`` studies of ``images`` instances
    each, new UIDs throughout: distinct instances the node must each analyse."""
    source = pydicom.dcmread(ultrasound_file())
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(studies):
        source.StudyInstanceUID = generate_uid()
        source.SeriesInstanceUID = generate_uid()
        source.PatientID = f"PHANTOM-{s}"
        for i in range(images):
            source.SOPInstanceUID = generate_uid()
            source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
            source.InstanceNumber = i + 1
            path = directory / f"s{s}-i{i}.dcm"
            source.save_as(path)
            paths.append(path)
    return paths


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)


@dataclass
class Site:
    root: Path
    catalog_url: str
    sections: dict[str, dict[str, Any]]
    port: int = field(default_factory=free_port)
    workers: list[subprocess.Popen[str]] = field(default_factory=list)
    node: NodeProcess | None = None
    destinations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        path = self.root / "precedent.toml"
        lines = []
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        for destination in self.destinations:
            lines.append("[[destinations]]")
            lines += [f"{key} = {toml_value(value)}" for key, value in destination.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start_node(self) -> NodeProcess:
        self.node = NodeProcess(self.config, self.root / "node.log")
        self.node.start(timeout=120)
        return self.node

    def start_worker(self, name: str, **variables: str) -> subprocess.Popen[str]:
        """``precedent worker``, as the systemd unit runs it (``variables`` added to its
        environment, e.g. the unit's ``LD_PRELOAD``)."""
        command = [str(precedent_executable()), "worker", "--config", str(self.config)]
        return self._worker(name, command, **variables)

    def start_celery_worker(self, name: str) -> subprocess.Popen[str]:
        """Celery's own command, the settings file named by ``PRECEDENT_CONFIG``."""
        celery = precedent_executable().with_name("celery")
        command = [str(celery), "-A", "workers.app", "worker", "--pool=solo", "--without-mingle"]
        return self._worker(name, command, PRECEDENT_CONFIG=str(self.config))

    def _worker(self, name: str, command: list[str], **variables: str) -> subprocess.Popen[str]:
        log = (self.root / f"worker-{name}.log").open("a")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, text=True, env=site_environment(**variables)
        )
        self.workers.append(process)
        return process

    def worker_log(self, name: str) -> str:
        return (self.root / f"worker-{name}.log").read_text()

    def stop(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.node is not None and self.node.process is not None and self.node.process.poll() is None:
            self.node.signal(signal.SIGTERM)
            try:
                self.node.wait(60)
            except subprocess.TimeoutExpired:
                self.node.kill()

    # The catalog, read as an administrator's SQL would.

    def analysis_states(self) -> dict[str, int]:
        return self._grouped(ANALYSES.c.state)

    def assessment_states(self) -> dict[str, int]:
        return self._grouped(STUDY_ASSESSMENTS.c.state)

    def attempts(self) -> list[int]:
        with open_catalog(self.catalog_url) as catalog, catalog.connection() as connection:
            return list(connection.execute(select(ANALYSES.c.attempts).order_by(ANALYSES.c.id)).scalars())

    def states_and_attempts(self) -> list[tuple[str, int]]:
        with open_catalog(self.catalog_url) as catalog, catalog.connection() as connection:
            rows = connection.execute(select(ANALYSES.c.state, ANALYSES.c.attempts).order_by(ANALYSES.c.id))
            return [(state, int(attempts)) for state, attempts in rows]

    def finished_at(self) -> list[Any]:
        with open_catalog(self.catalog_url) as catalog, catalog.connection() as connection:
            return list(connection.execute(select(ANALYSES.c.finished_at).order_by(ANALYSES.c.id)).scalars())

    def embeddings(self) -> int:
        with open_catalog(self.catalog_url) as catalog, catalog.connection() as connection:
            return int(connection.execute(select(func.count()).select_from(EMBEDDINGS)).scalar_one())

    def _grouped(self, column: Any) -> dict[str, int]:
        with open_catalog(self.catalog_url) as catalog, catalog.connection() as connection:
            rows = connection.execute(select(column, func.count()).group_by(column)).all()
        return {state: int(n) for state, n in rows}

    def wait_for_analyses(self, expected: int, timeout: float = 180) -> None:
        def finished() -> bool:
            states = self.analysis_states()
            return sum(states.get(s, 0) for s in ("done", "failed", "skipped")) >= expected

        wait_until(finished, timeout, f"{expected} analyses finished (now {self.analysis_states()})")


@contextlib.contextmanager
def open_catalog(url: str) -> Iterator[Catalog]:
    catalog = Catalog.open(url)
    try:
        yield catalog
    finally:
        catalog.close()


class PrivateRedis:
    """A real Redis server of the test's own, on a free port, that the test may kill and
    restart (the machine's shared one at 6379 is left alone). Keeps nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis on {self.port} answers")

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def unique_queue() -> str:
    """Tests sharing the machine's Redis keep to queues of their own."""
    return f"test-{uuid.uuid4().hex[:10]}"
