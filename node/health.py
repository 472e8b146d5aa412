"""``/healthz``: whether the node can do its work now, one check per thing it depends on.

Each check answers within :data:`CHECK_SECONDS`, whatever its dependency does: a database
or broker that hangs makes the probe fail quickly instead of hanging it. Checks run in
threads of their own, all at once; a check still waiting from an earlier probe is waited
on again, never started a second time, so a dependency hung for an hour holds one thread
per check, not one per probe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from node.catalog.recording import Catalog
from node.errors import CatalogUnavailable
from node.settings import Settings
from node.storage import disk_space

if TYPE_CHECKING:
    from workers.index_keeper import IndexKeeper

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
BROKER_SOCKET_SECONDS = 1.5
# The index is behind when it has not synced for this many similarity.sync_seconds
# (and at least INDEX_STALE_FLOOR_SECONDS: one slow round on a busy catalog is no fault).
INDEX_STALE_SYNCS = 5
INDEX_STALE_FLOOR_SECONDS = 5.0
CHECKS = ("catalog", "broker", "index", "disk")


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in self.checks.items()},
        }


class HealthChecks:
    """The checks of one node. ``index`` is None when analysis is off (no model bundle)."""

    def __init__(self, settings: Settings, catalog: Catalog, index: IndexKeeper | None) -> None:
        self._settings = settings
        self._catalog = catalog
        self._index = index
        self._probes = {
            "catalog": _Probe("catalog", self.catalog),
            "broker": _Probe("broker", self.broker),
            "index": _Probe("index", self.index),
            "disk": _Probe("disk", self.disk),
        }

    def run(self) -> Health:
        """Every check, at once; within about :data:`CHECK_SECONDS` in all."""
        deadline = time.monotonic() + CHECK_SECONDS
        started = {name: probe.start() for name, probe in self._probes.items()}
        return Health({name: probe.result(started[name], deadline) for name, probe in self._probes.items()})

    def catalog(self) -> Check:
        try:
            with self._catalog.connection() as connection:
                connection.execute(text("SELECT 1"))
        except CatalogUnavailable as exc:
            return Check(False, str(exc))
        return Check(True, f"{self._catalog.engine.dialect.name} answers")

    def broker(self) -> Check:
        if self._index is None:
            return Check(True, "not used: analysis is off")
        url = self._settings.queue.broker_url
        if not url:
            return _embedded_broker(self._settings.storage.data_dir / "queue")
        return _ping_broker(url)

    def index(self) -> Check:
        if self._index is None:
            return Check(True, "not used: analysis is off")
        state = self._index.state()
        if not state.running:
            return Check(False, "the index thread has stopped (see the node's log)")
        if not state.ready or state.since_sync is None:
            return Check(False, "still being loaded from the catalog")
        sync_seconds = self._settings.similarity.sync_seconds
        stale = max(INDEX_STALE_SYNCS * sync_seconds, INDEX_STALE_FLOOR_SECONDS)
        if state.since_sync > stale:
            return Check(
                False,
                f"last synced with the catalog {state.since_sync:.0f} s ago "
                f"(similarity.sync_seconds is {sync_seconds:g})",
            )
        return Check(True, f"{state.vectors} vectors, synced {state.since_sync:.1f} s ago")

    def disk(self) -> Check:
        storage = self._settings.storage
        try:
            space = disk_space(storage.data_dir, storage.min_free_bytes)
        except OSError as exc:
            return Check(False, f"storage.data_dir {storage.data_dir} unusable: {exc.strerror or exc}")
        return Check(not space.low, space.describe())


def _embedded_broker(folder: Path) -> Check:
    """The embedded broker is a folder every process of this machine writes messages to."""
    if not folder.is_dir():
        return Check(False, f"embedded broker folder {folder} is missing")
    if not os.access(folder, os.W_OK | os.X_OK):
        return Check(False, f"embedded broker folder {folder} is not writable")
    return Check(True, f"embedded (file system) in {folder}")


def _ping_broker(url: str) -> Check:
    from kombu.utils.url import maybe_sanitize_url

    shown = str(maybe_sanitize_url(url))
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=BROKER_SOCKET_SECONDS, socket_connect_timeout=BROKER_SOCKET_SECONDS
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            return Check(False, f"{shown} does not answer PING: {exc}")
        finally:
            client.close()
        return Check(True, f"{shown} answers PING")
    from kombu import Connection  # type: ignore[attr-defined]  # no type information shipped

    try:
        with Connection(url, connect_timeout=BROKER_SOCKET_SECONDS) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # kombu's transports raise their own types for one thing
        return Check(False, f"{shown} cannot be reached: {exc}")
    return Check(True, f"{shown} reached")


class _Probe:
    """One check, run in a thread of its own, at most one run at a time."""

    def __init__(self, name: str, check: Callable[[], Check]) -> None:
        self._name = name
        self._check = check
        self._lock = threading.Lock()
        self._running: _Run | None = None

    def start(self) -> _Run:
        """A new run, or the earlier one when it is still waiting on its dependency."""
        with self._lock:
            if self._running is None or not self._running.thread.is_alive():
                self._running = _Run(self._name, self._check)
            return self._running

    def result(self, run: _Run, deadline: float) -> Check:
        run.thread.join(max(0.0, deadline - time.monotonic()))
        if run.answer is None:
            waited = time.monotonic() - run.started
            return Check(False, f"no answer after {waited:.1f} s")
        return run.answer


class _Run:
    def __init__(self, name: str, check: Callable[[], Check]) -> None:
        self.answer: Check | None = None
        self.started = time.monotonic()
        self._check = check
        self.thread = threading.Thread(target=self._run, name=f"health-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.answer = self._check()
        except Exception as exc:  # a check must answer, whatever its dependency raised
            log.exception("health check failed")
            self.answer = Check(False, f"{type(exc).__name__}: {exc}")
