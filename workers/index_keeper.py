"""Keeping a model's similarity index in step with the catalog, in the background.

The node holds one :class:`IndexKeeper` for its model: a thread opens the index (from its
snapshot when usable, else rebuilt from the catalog) and then syncs it every
``similarity.sync_seconds``, so that an embedding committed by a worker is searchable
about half a second later. The snapshot is written when enough is new, and at stop.
Until the index is open, similarity requests get a clear "not ready" answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.catalog.recording import Catalog
from node.errors import CatalogUnavailable, NotSearchable
from node.settings import Settings
from workers.index import IndexOptions, Match, SimilarityIndex, snapshot_path

log = logging.getLogger(__name__)

# Vectors added since the last snapshot that make it worth writing a new one.
_SAVE_AFTER_VECTORS = 10_000
_SAVE_AFTER_SECONDS = 300.0


def index_options(settings: Settings) -> IndexOptions:
    s = settings.similarity
    return IndexOptions(kind=s.index, metric=s.metric, flat_max_vectors=s.flat_max_vectors)


def index_snapshot(settings: Settings, model_id: str) -> Path | None:
    if not settings.similarity.snapshot:
        return None
    directory = settings.storage.data_dir / "index"
    directory.mkdir(parents=True, exist_ok=True)
    return snapshot_path(directory, model_id)


def open_index(settings: Settings, catalog: Catalog, model_id: str) -> SimilarityIndex:
    """The model's index, ready to search (what a worker or the admin CLI uses)."""
    return SimilarityIndex.open(
        catalog, model_id, index_options(settings), index_snapshot(settings, model_id)
    )


@dataclass(frozen=True)
class KeeperState:
    """How the keeper stands, for the node's health check, metrics and status."""

    model_id: str
    vectors: int
    running: bool  # the thread is alive
    ready: bool  # the index is open and searchable
    since_sync: float | None  # seconds since it last opened or synced without error


class IndexKeeper:
    """The node's index of one model, opened and synced by a background thread."""

    def __init__(self, settings: Settings, catalog: Catalog, model_id: str) -> None:
        self._settings = settings
        self._catalog = catalog
        self._model_id = model_id
        self._index: SimilarityIndex | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_save = time.monotonic()
        self._synced_at: float | None = None

    def state(self) -> KeeperState:
        synced_at = self._synced_at
        return KeeperState(
            model_id=self._model_id,
            vectors=len(self),
            running=self._thread is not None and self._thread.is_alive(),
            ready=self._index is not None,
            since_sync=None if synced_at is None else time.monotonic() - synced_at,
        )

    def search(self, vectors: np.ndarray, k: int, *, exclude: Collection[int] = ()) -> list[list[Match]]:
        return self._ready().search(vectors, k, exclude=exclude)

    def __len__(self) -> int:
        index = self._index
        return 0 if index is None else len(index)

    def _ready(self) -> SimilarityIndex:
        index = self._index
        if index is None:
            raise NotSearchable("the similarity index is still being loaded; ask again shortly")
        return index

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="similarity-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        index = self._index
        if index is not None and index.snapshot is not None and index.unsaved:
            index.save()

    def _run(self) -> None:
        while self._index is None and not self._stop.is_set():
            try:
                self._index = open_index(self._settings, self._catalog, self._model_id)
                self._synced_at = time.monotonic()
                log.info("similarity index of model %s open: %d vectors", self._model_id[:12], len(self))
            except CatalogUnavailable as exc:
                log.error("similarity index cannot be opened yet: %s", exc)
                self._stop.wait(5.0)
        while not self._stop.wait(self._settings.similarity.sync_seconds):
            try:
                self._sync()
            except CatalogUnavailable as exc:
                log.error("similarity index sync: %s", exc)
            except Exception:  # the thread must outlive any one bad round
                log.exception("similarity index sync failed")

    def _sync(self) -> None:
        index = self._ready()
        index.sync(self._catalog)
        self._synced_at = time.monotonic()
        due = time.monotonic() - self._last_save > _SAVE_AFTER_SECONDS
        if index.snapshot is not None and (index.unsaved >= _SAVE_AFTER_VECTORS or (due and index.unsaved)):
            index.save()
            self._last_save = time.monotonic()
