"""Starting a worker process: ``precedent worker`` (and, via ``serve``, the local ones)."""

from __future__ import annotations

import logging
import os

from node.settings import Settings
from workers.app import app
from workers.runtime import bundle_of

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Check the model, then consume the node's queue until SIGTERM (warm shutdown: the
    task in hand finishes; a task cut short by SIGKILL is taken over when its lease ends).

    One task at a time runs in this process (Celery's solo pool), the model loaded before
    the first message; with ``queue.worker_concurrency`` > 1, forked children each load
    their own copy (torch's thread pools do not survive a fork).
    """
    app.use_settings(settings)
    concurrency = settings.queue.worker_concurrency
    if concurrency == 1:
        app.runtime.analyzer  # noqa: B018  (loads the model: a bad one stops us here)
    else:
        bundle_of(settings)
    log.info("worker consuming queue %r with %d process(es)", settings.queue.name, concurrency)
    app.worker_main(
        [
            "worker",
            f"--queues={settings.queue.name}",
            f"--concurrency={concurrency}",
            f"--pool={'solo' if concurrency == 1 else 'prefork'}",
            f"--loglevel={settings.logging.level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=precedent-{os.getpid()}@%h",
        ]
    )
