"""What a worker process holds while it runs: the catalog, the loaded model, the settings.

Built once per process on first use (after a prefork worker has forked), and closed with it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from node.catalog.analyses import AnalysisRecords, ModelRecord
from node.catalog.models import ANALYSES
from node.catalog.recording import Catalog
from node.catalog.results import ResultRecords
from node.catalog.work import Claim
from node.errors import ModelConfigError, NoModelConfigured
from node.settings import Settings
from workers.analysis import Analyzer
from workers.bundles import BundleError, ModelBundle, load_bundle

if TYPE_CHECKING:
    from workers.results import ResultMaker

log = logging.getLogger(__name__)

# Forward batches claimed at once: decoding overlaps the model only across batches.
BATCHES_PER_CLAIM = 4


def bundle_of(settings: Settings) -> ModelBundle:
    """Load and check the configured bundle; :class:`ModelConfigError` says what is wrong."""
    if settings.model.bundle is None:
        raise NoModelConfigured("model.bundle is not set: analysis is off")
    try:
        return load_bundle(settings.model.bundle)
    except BundleError as exc:
        raise ModelConfigError(f"{exc} (model.bundle)") from exc


def model_record(bundle: ModelBundle) -> ModelRecord:
    return ModelRecord(
        model_id=bundle.id,
        architecture=bundle.architecture,
        labels=bundle.labels,
        clinical_use=bundle.clinical_use,
        description=dict(bundle.description),
    )


@dataclass
class WorkerRuntime:
    settings: Settings

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog.open(self.settings.catalog_url())

    @cached_property
    def records(self) -> AnalysisRecords:
        return AnalysisRecords(self.catalog)

    @cached_property
    def results(self) -> ResultMaker:
        from workers.results import EarlierStudies, ResultMaker

        similar = EarlierStudies(self.settings, self.catalog, self.model_id)
        return ResultMaker(self.settings, ResultRecords(self.catalog), find_similar=similar)

    @cached_property
    def analyzer(self) -> Analyzer:
        bundle = bundle_of(self.settings)
        self.records.register_model(model_record(bundle))
        log.info("model %s (%s) loaded", bundle.id[:12], bundle.architecture)
        return Analyzer(bundle, self.settings.model, processes=self.settings.queue.worker_concurrency)

    @property
    def model_id(self) -> str:
        return self.analyzer.bundle.id

    def claim_batch(self, analysis_id: int) -> Claim:
        """Claim the named analysis and others already published for this model, up to a few
        forward batches: their own messages will then find them finished and do nothing, and
        the files of one batch are decoded while the model runs on the one before. Waits up
        to ``model.batch_wait_seconds`` once for a batch to fill."""
        lease = self.settings.queue.lease_seconds
        size = self.settings.model.batch_size * BATCHES_PER_CLAIM
        same_model = ANALYSES.c.model_id == self.model_id
        table = self.records.analyses
        claim = table.claim([analysis_id], lease, same_model)
        for wait in (0.0, self.settings.model.batch_wait_seconds):
            room = size - len(claim.ids)
            if room <= 0 or (wait and not claim.ids):
                break
            time.sleep(wait)
            more = table.claim(table.queued_ids(room, same_model), lease, same_model, token=claim.token)
            claim = _merged(claim, more)
        return claim

    def close(self) -> None:
        if "analyzer" in self.__dict__:
            self.analyzer.close()
        if "catalog" in self.__dict__:
            self.catalog.close()


def _merged(first: Claim, second: Claim) -> Claim:
    return Claim(first.token, tuple(sorted({*first.ids, *second.ids})))
