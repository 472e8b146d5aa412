"""One running node: the data directory, the catalog and the acceptor, started and
stopped together."""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
from types import FrameType

from node.acceptor import Acceptor, configure_pynetdicom
from node.catalog.recording import Catalog
from node.errors import StartupError
from node.ingest import Ingestor
from node.settings import Settings
from node.storage import ObjectStore

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
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
        self._previous_tempdir = configure_pynetdicom(
            self.store.incoming_dir,
            accept_private_sop_classes=settings.dicom.accept_private_sop_classes,
        )
        ingestor = Ingestor(
            self.store,
            self.catalog,
            max_instance_bytes=settings.dicom.max_instance_bytes,
            replace_duplicates=settings.storage.on_duplicate == "replace",
        )
        self.acceptor = Acceptor(settings.dicom, ingestor, self.catalog)

    def start(self) -> tuple[str, int]:
        try:
            return self.acceptor.start()
        except OSError as exc:
            dicom = self.settings.dicom
            raise StartupError(
                f"cannot listen on {dicom.bind}:{dicom.port} (dicom.bind, dicom.port): {exc.strerror or exc}"
            ) from exc

    def stop(self) -> bool:
        finished = self.acceptor.stop(self.settings.dicom.shutdown_timeout)
        self.catalog.close()
        tempfile.tempdir = self._previous_tempdir
        return finished


def serve_until_signalled(settings: Settings) -> None:
    """Run the node until SIGTERM or SIGINT, then shut down gracefully."""
    node = Node(settings)
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
