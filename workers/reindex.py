"""``precedent reindex``: the similarity index rebuilt from the catalog, or the whole archive
re-embedded with a new model.

Re-embedding runs in this process while the node goes on serving with its own model: every
stored image gets an analysis by the new model (results and embedding, keyed by the new
model id, as a worker would write them), then the new model's index is built and saved.
The node switches when its ``model.bundle`` names the new bundle: it then opens that
complete index from its snapshot. Interrupted, the command resumes: finished analyses are
kept, and rows a killed run held are taken again once their lease has run out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from node.catalog.analyses import AnalysisRecords
from node.catalog.models import ANALYSES
from node.catalog.recording import Catalog
from node.catalog.work import FAILED, PENDING, QUEUED, UNFINISHED
from node.errors import ModelConfigError
from node.settings import Settings
from workers.analysis import Analyzer
from workers.bundles import BundleError, load_bundle
from workers.index import SimilarityIndex
from workers.index_keeper import index_options, index_snapshot
from workers.runtime import model_record

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)``."""


@dataclass(frozen=True)
class ReEmbedding:
    model_id: str
    analysed: int
    failed: int
    indexed: int


def rebuild_index(settings: Settings, model_id: str, progress: Progress | None = None) -> int:
    """Rebuild ``model_id``'s index from the catalog and save its snapshot; returns the
    number of vectors indexed."""
    catalog = Catalog.open(settings.catalog_url())
    try:
        index = SimilarityIndex(model_id, index_options(settings), index_snapshot(settings, model_id))
        return index.rebuild(catalog, progress)
    finally:
        catalog.close()


def re_embed(settings: Settings, bundle_path: Path, progress: Progress | None = None) -> ReEmbedding:
    """Analyse every stored image with the bundle at ``bundle_path``, then build its index."""
    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise ModelConfigError(str(exc)) from exc
    model = settings.model.model_copy(update={"gradcam": False})  # embeddings, not explanations
    catalog = Catalog.open(settings.catalog_url())
    analyzer = Analyzer(bundle, model)
    try:
        records = AnalysisRecords(catalog)
        records.register_model(model_record(bundle))
        records.request_missing(bundle.id)
        _analyse_all(settings, records, analyzer, progress)
        counts = records.analyses.count_by_state(ANALYSES.c.model_id == bundle.id)
        index = SimilarityIndex(bundle.id, index_options(settings), index_snapshot(settings, bundle.id))
        indexed = index.rebuild(catalog)
    finally:
        analyzer.close()
        catalog.close()
    return ReEmbedding(bundle.id, counts["done"], counts[FAILED], indexed)


def _analyse_all(
    settings: Settings, records: AnalysisRecords, analyzer: Analyzer, progress: Progress | None
) -> None:
    model_id = analyzer.bundle.id
    mine = ANALYSES.c.model_id == model_id
    table = records.analyses
    batch = settings.model.batch_size * 4
    while True:
        counts = table.count_by_state(mine)
        total = sum(counts.values())
        if progress is not None:
            progress(total - sum(counts[s] for s in UNFINISHED), total)
        table.requeue_stale(settings.queue.republish_seconds)  # rows a killed run held
        ids = _waiting(records, model_id, batch)
        if not ids:
            if not any(counts[s] for s in UNFINISHED):
                return
            time.sleep(1.0)  # rows held by another run: taken over when their lease ends
            continue
        claim = table.claim(ids, settings.queue.lease_seconds, mine)
        if claim.ids:
            targets = records.targets(claim)
            records.record(claim, model_id, analyzer.analyse(targets, settings.storage.data_dir))


def _waiting(records: AnalysisRecords, model_id: str, limit: int) -> list[int]:
    c = ANALYSES.c
    with records.catalog.connection() as connection:
        found = connection.execute(
            select(c.id)
            .where(c.model_id == model_id, c.state.in_((PENDING, QUEUED)))
            .order_by(c.id)
            .limit(limit)
        )
        return list(found.scalars())
