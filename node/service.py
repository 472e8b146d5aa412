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
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from node.acceptor import Acceptor, configure_pynetdicom
from node.catalog.analyses import AnalysisRecords
from node.catalog.audit import AuditTrail
from node.catalog.deliveries import DeliveryQueue
from node.catalog.recording import Catalog
from node.dispatch import Dispatcher
from node.errors import StartupError
from node.forward import DestinationForwarder, new_ae, result_destinations
from node.handlers import SimilarityEdge
from node.health import HealthChecks
from node.http_endpoint import MetricsEndpoint
from node.ingest import Ingestor
from node.local_workers import LocalWorkers
from node.metrics import CatalogCollector, EdgeMetrics, LiveCollector
from node.observe import EdgeObserver, EdgeObservers
from node.settings import Settings
from node.similar import SimilarityService
from node.status import live_status
from node.storage import ObjectStore
from node.tls import OutgoingTls, server_context

if TYPE_CHECKING:
    from workers.index_keeper import IndexKeeper

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings, config_file: Path | None = None) -> None:
        self.settings = settings
        # First: a [tls] file the node cannot use stops the start-up before anything is made.
        self._server_tls = server_context(settings.tls) if settings.tls.enabled else None
        self._outgoing = OutgoingTls.for_destinations(settings.tls, settings.destinations)
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
        self.metrics = EdgeMetrics(CollectorRegistry())
        self.audit = AuditTrail(self.catalog, settings.audit) if settings.audit.enabled else None
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
            observers=EdgeObservers(self._edge_observers(), similar_ae_title=settings.dicom.similar_ae_title),
            tls=self._server_tls,
            outgoing=self._outgoing,
        )
        self.forwarders = self._forwarders()
        self.endpoint = self._endpoint()

    def _edge_observers(self) -> list[EdgeObserver]:
        """Who is told of every request at the network edge (:mod:`node.observe`)."""
        observers: list[EdgeObserver] = [self.metrics]
        if self.audit is not None:
            observers.append(self.audit)
        return observers

    def _endpoint(self) -> MetricsEndpoint | None:
        """``/metrics``, ``/healthz`` and ``/status.json``, when ``metrics.port`` is set."""
        if not self.settings.metrics.port:
            return None
        registry = self.metrics.registry
        destinations = [d.name for d in result_destinations(self.settings.destinations)]
        registry.register(CatalogCollector(self.catalog, destinations))
        registry.register(LiveCollector(self.acceptor.active_associations, self.index, self.store.data_dir))
        health = HealthChecks(self.settings, self.catalog, self.index)
        return MetricsEndpoint(self.settings.metrics, registry, health.run, self._live_status)

    def _live_status(self) -> dict[str, Any]:
        return live_status(
            self.acceptor.active_associations(), self.settings.dicom.max_associations, self.index
        )

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
            DestinationForwarder(
                destination,
                queue,
                self.store,
                ae,
                self.settings.forwarding,
                tls_args=self._outgoing.tls_args(destination),
            )
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
        self._start_endpoint()
        try:
            address = self.acceptor.start()
        except OSError as exc:
            if self.endpoint is not None:
                self.endpoint.stop()
            dicom = self.settings.dicom
            raise StartupError(
                f"cannot listen on {dicom.bind}:{dicom.port} (dicom.bind, dicom.port): {exc.strerror or exc}"
            ) from exc
        if self.audit is not None:  # what the edge told it meanwhile waits in its queue
            self.audit.start()
        if self.index is not None:
            self.index.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        if self.workers is not None:
            self.workers.start()
        for forwarder in self.forwarders:
            forwarder.start()
        return address

    def _start_endpoint(self) -> None:
        """First, so that a taken port stops the start-up before anything else runs."""
        if self.endpoint is None:
            return
        try:
            self.endpoint.start()
        except OSError as exc:
            metrics = self.settings.metrics
            raise StartupError(
                f"cannot listen on {metrics.bind}:{metrics.port} (metrics.bind, metrics.port): "
                f"{exc.strerror or exc}"
            ) from exc

    def stop(self) -> bool:
        finished = self.acceptor.stop(self.settings.dicom.shutdown_timeout)
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.workers is not None:
            self.workers.stop(self.settings.dicom.shutdown_timeout)
        if self.dispatcher is not None:
            self.dispatcher.stop()
        for forwarder in self.forwarders:
            forwarder.stop()
        if self.index is not None:
            self.index.stop()
        if self.audit is not None:  # after the acceptor: the last associations' events are written
            self.audit.stop(self.settings.dicom.shutdown_timeout)
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
