"""Taking in one received instance: check it, place it durably, record it.

The order is the invariant "nothing acknowledged is lost": the file is durable
and its catalog row committed before :meth:`Ingestor.ingest` returns, and only
its return lets the network edge answer Success. Nothing here knows DIMSE.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from node.catalog.recording import Catalog
from node.errors import InstanceTooLarge
from node.header import InstanceHeader, check_matches_request, read_instance_header
from node.storage import ObjectStore

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE_KEPT = "duplicate kept"
    REPLACED = "replaced"


@dataclass(frozen=True)
class ReceivedInstance:
    """A file pynetdicom wrote for one C-STORE, and what the request said about it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae_title: str


class Ingestor:
    def __init__(
        self,
        store: ObjectStore,
        catalog: Catalog,
        *,
        max_instance_bytes: int,
        replace_duplicates: bool,
        analyse_with: str | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._max_instance_bytes = max_instance_bytes
        self._replace_duplicates = replace_duplicates
        self._analyse_with = analyse_with

    def ingest(self, received: ReceivedInstance) -> tuple[Outcome, InstanceHeader]:
        """Store and catalogue one instance; raise :class:`~node.errors.IngestError` if refused."""
        size = received.path.stat().st_size
        if size > self._max_instance_bytes:
            # Numbers first: the Error Comment (LO) keeps only 64 characters.
            raise InstanceTooLarge(
                f"{size} bytes > limit {self._max_instance_bytes} (dicom.max_instance_bytes)"
            )
        header = read_instance_header(received.path)
        check_matches_request(header, received.sop_class_uid, received.sop_instance_uid)
        if self._replace_duplicates:
            return self._replace(received, header), header
        return self._add(received, header), header

    def _add(self, received: ReceivedInstance, header: InstanceHeader) -> Outcome:
        # A catalogued instance always has its file (rows are committed after the file is
        # placed, and files are never removed under a row), so no file means not catalogued:
        # the catalog is asked only when a file is there (a duplicate, or a crash's orphan).
        uid = header.sop_instance_uid
        if self._store.holds(uid) and self._catalog.has_instance(uid):
            return Outcome.DUPLICATE_KEPT
        self._store.require_free_space()
        stored = self._store.place(received.path, header.sop_instance_uid)
        try:
            added = self._catalog.add_instance(header, stored, received.calling_ae_title, self._analyse_with)
        except Exception:  # whatever failed, a file without its row must not stay
            self._store.remove(stored.relative_path)
            raise
        return Outcome.STORED if added else Outcome.DUPLICATE_KEPT

    def _replace(self, received: ReceivedInstance, header: InstanceHeader) -> Outcome:
        existed = self._catalog.has_instance(header.sop_instance_uid)
        self._store.require_free_space()
        stored = self._store.place(received.path, header.sop_instance_uid)
        self._catalog.replace_instance(header, stored, received.calling_ae_title, self._analyse_with)
        return Outcome.REPLACED if existed else Outcome.STORED
