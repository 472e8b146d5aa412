"""``precedent status``: what the node holds and how its analyses stand, in one screen."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from node.catalog.analyses import AnalysisRecords
from node.catalog.models import ANALYSES, INSTANCES, MODELS, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.errors import ModelConfigError
from node.settings import Settings


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
        }
    finally:
        catalog.close()


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
    if report["failures"]:
        failures = Table("failed analyses: reason", "count", "example SOP Instance UID")
        for failure in report["failures"]:
            failures.add_row(failure["reason"], str(failure["count"]), failure["example_sop_instance_uid"])
        console.print(failures)


def _counts(counts: dict[str, int]) -> list[str]:
    return [str(counts[state]) for state in ("pending", "queued", "running", "done", "failed", "skipped")]
