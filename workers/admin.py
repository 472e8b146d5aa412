"""Administrator's requests on analyses: ``precedent reanalyze``."""

from __future__ import annotations

from node.catalog.analyses import AnalysisRecords
from node.catalog.recording import Catalog
from node.settings import Settings
from workers.app import ANALYZE_INSTANCE, app
from workers.runtime import bundle_of, model_record


def request_reanalysis(settings: Settings, *, study_uid: str | None, failed_only: bool) -> tuple[int, int]:
    """Record the requests in the catalog (the outbox), then publish as many as the queue's
    in-flight limit allows; a running node publishes the rest. Returns (requested, published)."""
    bundle = bundle_of(settings)
    catalog = Catalog.open(settings.catalog_url())
    try:
        records = AnalysisRecords(catalog)
        records.register_model(model_record(bundle))
        requested = records.request_reanalysis(bundle.id, study_uid=study_uid, failed_only=failed_only)
        app.use_settings(settings)
        ids = records.analyses.take_unpublished(settings.queue.max_in_flight)
        try:
            app.publish(ANALYZE_INSTANCE, ids)
        except Exception as exc:  # broker down: the node publishes them when it can
            records.analyses.unpublish(ids, f"broker unreachable: {exc}"[:500])
            ids = []
    finally:
        catalog.close()
    return requested, len(ids)
