"""``precedent status``: what the node holds and how its analyses stand, in one screen.

Most of it is read from the catalog; what only the running node knows (its associations,
its similarity index) is asked of it at ``/status.json`` on its HTTP endpoint, when
``metrics.port`` is set. :func:`live_status` is what the node answers there.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from node.catalog.analyses import AnalysisRecords
from node.catalog.deliveries import DONE, FAILED, PENDING, RUNNING, DeliveryQueue
from node.catalog.models import ANALYSES, EMBEDDINGS, INSTANCES, MODELS, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.catalog.work import UNFINISHED
from node.errors import ModelConfigError
from node.forward import result_destinations
from node.settings import MetricsSettings, Settings
from node.storage import disk_space

if TYPE_CHECKING:
    from workers.index_keeper import IndexKeeper

DELIVERY_STATES = (PENDING, RUNNING, DONE, FAILED)
NODE_TIMEOUT_SECONDS = 2.0


def live_status(associations: int, max_associations: int, index: IndexKeeper | None) -> dict[str, Any]:
    """The node's ``/status.json``: what the catalog cannot tell."""
    report: dict[str, Any] = {"associations": {"active": associations, "max": max_associations}, "index": {}}
    if index is not None:
        state = index.state()
        report["index"][state.model_id] = {
            "vectors": state.vectors,
            "ready": state.ready,
            "seconds_since_sync": state.since_sync,
        }
    return report


def collect_status(settings: Settings) -> dict[str, Any]:
    catalog = Catalog.open(settings.catalog_url())
    try:
        records = AnalysisRecords(catalog)
        with catalog.connection() as connection:
            studies = connection.execute(select(func.count()).select_from(STUDIES)).scalar_one()
            instances = connection.execute(select(func.count()).select_from(INSTANCES)).scalar_one()
            models = connection.execute(select(MODELS.c.model_id, MODELS.c.architecture)).all()
            embeddings = {
                str(model_id): int(n)
                for model_id, n in connection.execute(
                    select(EMBEDDINGS.c.model_id, func.count()).group_by(EMBEDDINGS.c.model_id)
                )
            }
        analyses = {
            model_id: {
                "architecture": arch,
                **records.analyses.count_by_state(ANALYSES.c.model_id == model_id),
            }
            for model_id, arch in models
        }
        assessments = {
            model_id: records.assessments.count_by_state(STUDY_ASSESSMENTS.c.model_id == model_id)
            for model_id, _ in models
        }
        node = _ask_node(settings)
        return {
            "catalog": make_url(settings.catalog_url()).render_as_string(hide_password=True),
            "studies": int(studies),
            "instances": int(instances),
            "analysis": _analysis_setting(settings),
            "analyses": analyses,
            "study_assessments": assessments,
            "queue_depth": {"images": _unfinished(analyses), "studies": _unfinished(assessments)},
            "failures": [
                {"reason": reason, "example_sop_instance_uid": uid, "count": n}
                for reason, uid, n in records.failures()
            ],
            "destinations": _destinations(settings, DeliveryQueue(catalog)),
            "node": {key: node[key] for key in ("url", "answering", "detail")},
            "associations": {
                **(node["live"] or {}).get("associations", {"active": None}),
                "max": settings.dicom.max_associations,
                "detail": node["detail"],
            },
            "index": _index(embeddings, node["live"]),
            "disk": _disk(settings),
        }
    finally:
        catalog.close()


def _unfinished(counts: dict[str, dict[str, Any]]) -> int:
    return sum(int(states[state]) for states in counts.values() for state in UNFINISHED)


def node_url(metrics: MetricsSettings) -> str | None:
    """Where ``precedent status`` finds the node on this host, if it has an endpoint."""
    if not metrics.port:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(metrics.bind, metrics.bind)
    return f"http://[{host}]:{metrics.port}" if ":" in host else f"http://{host}:{metrics.port}"


def _ask_node(settings: Settings) -> dict[str, Any]:
    url = node_url(settings.metrics)
    if url is None:
        return {"url": None, "answering": False, "detail": "unknown (metrics.port is off)", "live": None}
    try:
        with urllib.request.urlopen(f"{url}/status.json", timeout=NODE_TIMEOUT_SECONDS) as response:
            live = json.load(response)
    except (OSError, ValueError) as exc:  # URLError is an OSError; bad JSON a ValueError
        why = getattr(exc, "reason", exc)  # URLError wraps the socket's error
        said = getattr(why, "strerror", None) or str(why)
        return {
            "url": url,
            "answering": False,
            "detail": f"node not answering at {url}: {said}",
            "live": None,
        }
    return {"url": url, "answering": True, "detail": f"from the node at {url}", "live": live}


def _index(embeddings: dict[str, int], live: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per model: the embeddings the catalog holds, and the vectors in the node's index
    (None when the node was not asked or keeps no index of that model)."""
    in_node: dict[str, Any] = (live or {}).get("index", {})
    return {
        model_id: {
            "catalog_embeddings": int(embeddings.get(model_id, 0)),
            "node_vectors": in_node[model_id]["vectors"] if model_id in in_node else None,
        }
        for model_id in sorted({*embeddings, *in_node})
    }


def _disk(settings: Settings) -> dict[str, Any]:
    storage = settings.storage
    try:
        space = disk_space(storage.data_dir, storage.min_free_bytes)
    except OSError as exc:
        return {"path": str(storage.data_dir), "error": str(exc.strerror or exc)}
    return {
        "path": str(space.path.resolve()),
        "free_bytes": space.free_bytes,
        "total_bytes": space.total_bytes,
        "min_free_bytes": space.min_free_bytes,
        "below_min_free": space.low,
        "detail": space.describe(),
    }


def _destinations(settings: Settings, queue: DeliveryQueue) -> list[dict[str, Any]]:
    configured = {d.name: d for d in result_destinations(settings.destinations)}
    return [
        {
            "name": state.destination,
            "ae_title": configured[state.destination].ae_title,
            "address": f"{configured[state.destination].host}:{configured[state.destination].port}",
            **{s: state.counts.get(s, 0) for s in DELIVERY_STATES},
            "last_delivered_at": _iso(state.last_delivered_at),
            "next_attempt_at": _iso(state.next_attempt_at) if state.counts.get(PENDING) else None,
            "last_failure": state.last_failure,
        }
        for state in queue.states(list(configured))
    ]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _analysis_setting(settings: Settings) -> dict[str, Any]:
    if settings.model.bundle is None:
        return {"on": False, "why": "model.bundle is not set: images are stored and served, not analysed"}
    from workers.runtime import bundle_of  # torch: only when there is a model to check

    try:
        bundle = bundle_of(settings)
    except ModelConfigError as exc:
        return {"on": False, "why": str(exc)}
    return {
        "on": True,
        "model_id": bundle.id,
        "architecture": bundle.architecture,
        "labels": list(bundle.labels),
        "clinical_use": bundle.clinical_use,
    }


def print_status(report: dict[str, Any]) -> None:
    console = Console()
    console.print(f"catalog  {report['catalog']}")
    console.print(f"holds    {report['studies']} studies, {report['instances']} instances")
    _print_node(console, report)
    analysis = report["analysis"]
    if analysis["on"]:
        use = "clinical use" if analysis["clinical_use"] else "NOT for clinical use"
        console.print(
            f"analysis on: {analysis['architecture']} {analysis['model_id'][:12]} "
            f"({', '.join(analysis['labels'])}; {use})"
        )
    else:
        console.print(f"[bold]analysis off[/bold]: {analysis['why']}")
    table = Table("model", "kind", "pending", "queued", "running", "done", "failed", "skipped")
    for model_id, counts in report["analyses"].items():
        table.add_row(model_id[:12], "images", *_counts(counts))
        table.add_row(model_id[:12], "studies", *_counts(report["study_assessments"][model_id]))
    if report["analyses"]:
        console.print(table)
    if report["destinations"]:
        _print_destinations(console, report["destinations"])
    if report["failures"]:
        failures = Table("failed analyses: reason", "count", "example SOP Instance UID")
        for failure in report["failures"]:
            failures.add_row(failure["reason"], str(failure["count"]), failure["example_sop_instance_uid"])
        console.print(failures)


def _print_node(console: Console, report: dict[str, Any]) -> None:
    """Associations, queue, disk and index: one line each, never wrapped (paths, URLs)."""

    def line(label: str, text: str, style: str = "") -> None:
        console.print(f"{label:<8} {text}", style=style or None, soft_wrap=True, markup=False)

    associations = report["associations"]
    if associations["active"] is not None:
        active = f"{associations['active']} of {associations['max']} associations active"
        line("node", f"{active} ({associations['detail']})")
    elif report["node"]["url"] is None:
        line("node", f"associations {associations['detail']}")
    else:
        line("node", f"associations unknown: {associations['detail']}", "bold red")
    depth = report["queue_depth"]
    line("queue", f"{depth['images']} images and {depth['studies']} studies waiting for analysis")
    disk = report["disk"]
    if "error" in disk:
        line("disk", f"{disk['path']} unusable: {disk['error']}", "bold red")
    else:
        line("disk", disk["detail"], "bold red" if disk["below_min_free"] else "")
    for model_id, index in report["index"].items():
        vectors = "?" if index["node_vectors"] is None else index["node_vectors"]
        line(
            "index",
            f"{model_id[:12]}: {vectors} vectors in the node's index, "
            f"{index['catalog_embeddings']} embeddings in the catalog",
        )


def _print_destinations(console: Console, destinations: list[dict[str, Any]]) -> None:
    table = Table("destination", "AE title", "address", *DELIVERY_STATES, "last delivered", "last failure")
    for d in destinations:
        table.add_row(
            d["name"],
            d["ae_title"],
            d["address"],
            *(str(d[s]) for s in DELIVERY_STATES),
            d["last_delivered_at"] or "-",
            d["last_failure"] or "-",
        )
    console.print(table)


def _counts(counts: dict[str, int]) -> list[str]:
    return [str(counts[state]) for state in ("pending", "queued", "running", "done", "failed", "skipped")]
