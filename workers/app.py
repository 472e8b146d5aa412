"""The Celery app: the one piece of process-wide state besides the settings.

Messages carry only the id of a catalog row (see :mod:`node.catalog.work`): the broker
is a wake-up channel, the catalog the truth. With ``queue.broker_url`` empty the broker
is kombu's file-system transport in ``<data_dir>/queue`` — no server to install, shared
by the processes of one machine.

``precedent worker`` hands its settings over with :meth:`PrecedentCelery.use_settings`;
``celery -A workers.app worker`` finds them through ``PRECEDENT_CONFIG`` and the
``PRECEDENT_*`` environment, read when Celery first needs its configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import setup_logging

from node.logs import configure_logging
from node.settings import Settings, config_file_from_environment, load_settings

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime

ANALYZE_INSTANCE = "precedent.analyze_instance"
ASSESS_STUDY = "precedent.assess_study"


class PrecedentCelery(Celery):  # type: ignore[misc]
    """A Celery app that knows the node's settings."""

    def __init__(self) -> None:
        super().__init__("precedent", include=["workers.tasks"])
        self._settings: Settings | None = None
        self._runtime: WorkerRuntime | None = None
        self.on_configure.connect(self._configure_from_environment)

    @property
    def runtime(self) -> WorkerRuntime:
        """The worker-side state (catalog, model), made on first use in each process."""
        if self._runtime is None:
            from workers.runtime import WorkerRuntime  # torch: only where tasks run

            self._runtime = WorkerRuntime(self.settings)
        return self._runtime

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self.use_settings(load_settings(config_file_from_environment()))
        assert self._settings is not None
        return self._settings

    def use_settings(self, settings: Settings) -> None:
        self._settings = settings
        self.conf.update(celery_config(settings))

    def _configure_from_environment(self, **_: Any) -> None:
        if self._settings is None:
            self._settings = load_settings(config_file_from_environment())
            self.config_from_object(celery_config(self._settings))

    def publish(self, task_name: str, ids: Sequence[int]) -> None:
        """Publish one message per row id; raises the broker's error if it is unreachable
        (the caller hands the rows back to the outbox)."""
        queue = self.settings.queue.name
        with self.producer_or_acquire() as producer:
            for row_id in ids:
                self.send_task(
                    task_name,
                    args=[row_id],
                    queue=queue,
                    producer=producer,
                    retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
                )


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings, derived from ours: late acknowledgement, one message prefetched
    per process, no result backend (results go to the catalog)."""
    queue = settings.queue
    config: dict[str, Any] = {
        "task_default_queue": queue.name,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "worker_concurrency": queue.worker_concurrency,
    }
    if queue.broker_url:
        config["broker_url"] = queue.broker_url
        # A message of a worker that died comes back after this; the catalog's lease
        # recovery usually acts first, and a duplicate is harmless.
        visibility = int(queue.lease_seconds + queue.republish_seconds)
        config["broker_transport_options"] = {"visibility_timeout": visibility}
        return config
    folder = (settings.storage.data_dir / "queue").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config["broker_url"] = "filesystem://"
    config["broker_transport_options"] = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        # kombu's default is "control" in the working directory
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }
    # The file-system transport has no broadcast: no remote control, gossip or mingle.
    config["worker_enable_remote_control"] = False
    return config


app = PrecedentCelery()


@setup_logging.connect  # type: ignore[untyped-decorator]
def _log_as_the_node_does(**_: Any) -> None:
    """Workers log like the node (one line per record, UIDs not names), whichever way
    they were started; connecting here also keeps Celery off the root logger."""
    configure_logging(app.settings.logging.level)
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)  # "Task … received"
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)  # "Task … succeeded"
