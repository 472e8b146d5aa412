"""One running node: the data directory, the catalog, the acceptor and, when a model
bundle is configured, the outbox dispatcher and the local analysis workers, started and
stopped together."""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from node.acceptor import Acceptor, configure_pynetdicom
from node.catalog.analyses import AnalysisRecords
from node.catalog.deliveries import DeliveryQueue
from node.catalog.recording import Catalog
from node.dispatch import Dispatcher
from node.errors import StartupError
from node.forward import DestinationForwarder, new_ae, result_destinations
from node.handlers import SimilarityEdge
from node.ingest import Ingestor
from node.local_workers import LocalWorkers
from node.settings import Settings
from node.similar import SimilarityService
from node.storage import ObjectStore

if TYPE_CHECKING:
    from workers.index_keeper import IndexKeeper

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings, config_file: Path | None = None) -> None:
        self.settings = settings
        self.store = ObjectStore(
            settings.storage.data_dir,
            fsync=settings.storage.fsync,
            min_free_bytes=settings.storage.min_free_bytes,
        )
        try:
            self.store.prepare()
        except OSError as exc:
            raise StartupError(
                f"storage.data_dir {settings.storage.data_dir} is unusable: {exc.strerror or exc}"
            ) from exc
        self.catalog = Catalog.open(settings.catalog_url())
        self.model_id = self._check_model()
        self.dispatcher = self._dispatcher() if self.model_id else None
        self.workers = (
            LocalWorkers(settings.queue.serve_workers, config_file)
            if self.model_id and settings.queue.serve_workers
            else None
        )
        self._previous_tempdir = configure_pynetdicom(
            self.store.incoming_dir,
            accept_private_sop_classes=settings.dicom.accept_private_sop_classes,
        )
        ingestor = Ingestor(
            self.store,
            self.catalog,
            max_instance_bytes=settings.dicom.max_instance_bytes,
            replace_duplicates=settings.storage.on_duplicate == "replace",
            analyse_with=self.model_id,
        )
        self.index = self._index_keeper()
        similarity = SimilarityEdge(
            settings.dicom.similar_ae_title,
            SimilarityService(self.catalog, self.index, self.model_id, settings.similarity),
            settings.similarity,
        )
        self.acceptor = Acceptor(
            settings.dicom,
            ingestor,
            self.catalog,
            store=self.store,
            destinations=settings.destinations,
            similarity=similarity,
        )
        self.forwarders = self._forwarders()

    def _check_model(self) -> str | None:
        """Load and check the bundle now, so that a bad one stops the start-up, not the
        first image; without one the node stores and serves, and says so."""
        if self.settings.model.bundle is None:  # checked first: no torch import for a storing node
            log.warning("analysis is off: model.bundle is not set; images are stored and served only")
            return None
        from workers.runtime import bundle_of, model_record

        bundle = bundle_of(self.settings)
        AnalysisRecords(self.catalog).register_model(model_record(bundle))
        log.info(
            "analysis on: model %s (%s, labels %s)",
            bundle.id[:12],
            bundle.architecture,
            ", ".join(bundle.labels),
        )
        return bundle.id

    def _index_keeper(self) -> IndexKeeper | None:
        if self.model_id is None:
            return None
        from workers.index_keeper import IndexKeeper

        return IndexKeeper(self.settings, self.catalog, self.model_id)

    def _forwarders(self) -> list[DestinationForwarder]:
        queue = DeliveryQueue(self.catalog)
        ae = new_ae(self.settings.dicom.ae_title, self.settings.forwarding)
        return [
            DestinationForwarder(destination, queue, self.store, ae, self.settings.forwarding)
            for destination in result_destinations(self.settings.destinations)
        ]

    def _dispatcher(self) -> Dispatcher:
        from workers.app import ANALYZE_INSTANCE, ASSESS_STUDY, app

        assert self.model_id is not None
        app.use_settings(self.settings)
        return Dispatcher(
            AnalysisRecords(self.catalog),
            app.publish,
            model_id=self.model_id,
            analyze_task=ANALYZE_INSTANCE,
            assess_task=ASSESS_STUDY,
            queue=self.settings.queue,
            study=self.settings.study,
        )

    def start(self) -> tuple[str, int]:
        try:
            address = self.acceptor.start()
        except OSError as exc:
            dicom = self.settings.dicom
            raise StartupError(
                f"cannot listen on {dicom.bind}:{dicom.port} (dicom.bind, dicom.port): {exc.strerror or exc}"
            ) from exc
        if self.index is not None:
            self.index.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        if self.workers is not None:
            self.workers.start()
        for forwarder in self.forwarders:
            forwarder.start()
        return address

    def stop(self) -> bool:
        finished = self.acceptor.stop(self.settings.dicom.shutdown_timeout)
        if self.workers is not None:
            self.workers.stop(self.settings.dicom.shutdown_timeout)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        for forwarder in self.forwarders:
            forwarder.stop()
        if self.index is not None:
            self.index.stop()
        self.catalog.close()
        tempfile.tempdir = self._previous_tempdir
        return finished


def serve_until_signalled(settings: Settings, config_file: Path | None = None) -> None:
    """Run the node until SIGTERM or SIGINT, then shut down gracefully."""
    node = Node(settings, config_file)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing associations in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node.start()
    print("ready", flush=True)  # a line supervisors and tests can wait for
    stop.wait()
    node.stop()
    log.info("stopped")
