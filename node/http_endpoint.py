"""The node's small HTTP endpoint (``metrics.bind:metrics.port``), read-only:

* ``/metrics``: the node's Prometheus registry, in the text format;
* ``/healthz``: the health checks as JSON, 200 when all pass, 503 otherwise;
* ``/status.json``: what only the running node knows, for ``precedent status``.

Anything else is 404; methods other than GET and HEAD are 501. Served by the standard
library's threading server in daemon threads, so a slow client holds nobody else up.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from node.health import Health
from node.settings import MetricsSettings

log = logging.getLogger(__name__)

JSON = "application/json"
Answer = tuple[HTTPStatus, str, bytes]


class MetricsEndpoint:
    def __init__(
        self,
        settings: MetricsSettings,
        registry: CollectorRegistry,
        health: Callable[[], Health],
        live_status: Callable[[], dict[str, Any]],
    ) -> None:
        self._settings = settings
        self._routes: dict[str, Callable[[], Answer]] = {
            "/metrics": lambda: (HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _health_answer(health()),
            "/status.json": lambda: (HTTPStatus.OK, JSON, _json(live_status())),
        }
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Listen and serve in a daemon thread; return the bound address. Raises OSError
        when the address cannot be bound."""
        self._server = _Server((self._settings.bind, self._settings.port), self._routes)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-endpoint", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        log.info("metrics and health on http://%s:%s/ (/metrics, /healthz)", host, port)
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _health_answer(health: Health) -> Answer:
    status = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
    return status, JSON, _json(health.as_json())


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2).encode() + b"\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: dict[str, Callable[[], Answer]]) -> None:
        self.routes = routes
        if ":" in address[0]:  # an IPv6 address, e.g. "::"
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "precedent"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            status, content_type, payload = HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"
        else:
            try:
                status, content_type, payload = route()
            except Exception:
                log.exception("answering %s", self.path)
                status, content_type, payload = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"error\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
