"""The analysis workers ``precedent serve`` runs beside itself, so that one command runs
everything on one machine. Each is an ordinary ``precedent worker`` process — the same
thing an administrator starts on other machines — restarted if it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_RESTART_DELAY_SECONDS = 2.0
# glibc's malloc returns torch's large buffers to the kernel after each batch and takes
# them back page by page: measured here, tcmalloc made a worker 10-75 % faster.
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def worker_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The node's environment, with tcmalloc preloaded where the system has it (Debian's
    libtcmalloc-minimal4) and nothing else is preloaded already."""
    child = dict(environment)
    if TCMALLOC.exists() and not child.get("LD_PRELOAD"):
        child["LD_PRELOAD"] = str(TCMALLOC)
    return child


class LocalWorkers:
    def __init__(self, count: int, config_file: Path | None) -> None:
        self._count = count
        self._command = [sys.executable, "-m", "node", "worker"]
        if config_file is not None:
            self._command += ["--config", str(config_file.resolve())]
        self._processes: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self._processes = [self._spawn() for _ in range(self._count)]
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        self._watcher.start()

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self._command, env=worker_environment(os.environ))
        log.info("analysis worker started (pid %d)", process.pid)
        return process

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for n, process in enumerate(self._processes):
                code = process.poll()
                if code is not None and not self._stop.is_set():
                    log.error("analysis worker %d exited with %d; restarting", process.pid, code)
                    time.sleep(_RESTART_DELAY_SECONDS)
                    self._processes[n] = self._spawn()

    def stop(self, timeout: float) -> None:
        """SIGTERM (Celery's warm shutdown: the task in hand finishes), then SIGKILL."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("analysis worker %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
