"""Precedent nodes for tests: in this process (fast) or as a real `precedent serve` process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.service import Node
from node.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_settings(data_dir: Path, port: int, catalog_url: str = "", **sections: dict[str, Any]) -> Settings:
    """Settings for a test node on loopback; ``sections`` override per section."""
    values: dict[str, dict[str, Any]] = {
        "dicom": {"bind": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(data_dir), "min_free_bytes": 0},
        "catalog": {"url": catalog_url},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    return Settings(**values)


@dataclass
class RunningNode:
    node: Node
    port: int

    @property
    def data_dir(self) -> Path:
        return self.node.store.data_dir


@contextlib.contextmanager
def running_node(settings: Settings) -> Iterator[RunningNode]:
    node = Node(settings)
    _, port = node.start()
    try:
        yield RunningNode(node, port)
    finally:
        node.stop()


def precedent_executable() -> Path:
    return Path(sys.executable).with_name("precedent")


def site_environment(**variables: str) -> dict[str, str]:
    """This process's environment without PRECEDENT_* variables, plus ``variables``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRECEDENT_")}
    return {**clean, **variables}


def run_precedent(
    *args: str, cwd: Path | None = None, timeout: float = 120, **variables: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``precedent`` command as an administrator would, and let it finish."""
    return subprocess.run(
        [str(precedent_executable()), *args],
        cwd=cwd,
        env=site_environment(**variables),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class NodeProcess:
    """`precedent serve` as its own process, as a site runs it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            [str(precedent_executable()), "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("a"),
            text=True,
            env=site_environment(),
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.strip() == "ready":
                return
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError(f"node did not start; log:\n{self.log.read_text()}")

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
