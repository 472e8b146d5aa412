"""Reading a node's HTTP endpoint (``metrics.port``) as a monitoring system would."""

from __future__ import annotations

import http.client
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def health(port: int) -> tuple[int, dict[str, Any]]:
    """``/healthz``: its HTTP status and its JSON."""
    status, body = get(port, "/healthz")
    return status, json.loads(body)


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (``name`` as exposed, e.g. with ``_total``)."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise KeyError(f"{name}{labels or ''} is not exposed")
