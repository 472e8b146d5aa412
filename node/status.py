"""``precedent status``: what the node holds and how its analyses stand, in one screen."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from node.catalog.analyses import AnalysisRecords
from node.catalog.deliveries import DONE, FAILED, PENDING, RUNNING, DeliveryQueue
from node.catalog.models import ANALYSES, INSTANCES, MODELS, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.errors import ModelConfigError
from node.forward import result_destinations
from node.settings import Settings

DELIVERY_STATES = (PENDING, RUNNING, DONE, FAILED)


def collect_status(settings: Settings) -> dict[str, Any]:
    catalog = Catalog.open(settings.catalog_url())
    try:
        records = AnalysisRecords(catalog)
        with catalog.connection() as connection:
            studies = connection.execute(select(func.count()).select_from(STUDIES)).scalar_one()
            instances = connection.execute(select(func.count()).select_from(INSTANCES)).scalar_one()
            models = connection.execute(select(MODELS.c.model_id, MODELS.c.architecture)).all()
        return {
            "catalog": make_url(settings.catalog_url()).render_as_string(hide_password=True),
            "studies": int(studies),
            "instances": int(instances),
            "analysis": _analysis_setting(settings),
            "analyses": {
                model_id: {
                    "architecture": arch,
                    **records.analyses.count_by_state(ANALYSES.c.model_id == model_id),
                }
                for model_id, arch in models
            },
            "study_assessments": {
                model_id: records.assessments.count_by_state(STUDY_ASSESSMENTS.c.model_id == model_id)
                for model_id, _ in models
            },
            "failures": [
                {"reason": reason, "example_sop_instance_uid": uid, "count": n}
                for reason, uid, n in records.failures()
            ],
            "destinations": _destinations(settings, DeliveryQueue(catalog)),
        }
    finally:
        catalog.close()


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
