"""The Celery tasks. Each names one catalog row; the row says what to do and whether it
is still to be done (see :mod:`node.catalog.work`), so a duplicate message is harmless.

Transient trouble (the catalog or a file system unreachable, a model error that may
pass) is retried with exponential backoff up to ``queue.max_attempts``; a row that keeps
failing is recorded as failed with the last reason, for ``precedent reanalyze --failed``.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any

from celery import Task

from node.catalog.analyses import AnalysisOutcome, AnalysisResult, AnalysisTarget, StudyAssessment
from node.catalog.work import FAILED, PENDING, QUEUED, Claim
from node.errors import CatalogUnavailable
from workers.app import ANALYZE_INSTANCE, ASSESS_STUDY, app

log = logging.getLogger(__name__)


@app.task(name=ANALYZE_INSTANCE, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def analyze_instance(self: Task[Any, Any], analysis_id: int) -> int:
    """Analyse the named instance, and as many other waiting ones as fill a batch.

    Returns how many analyses this run finished (0 for a duplicate message).
    """
    runtime = app.runtime
    claim = runtime.claim_batch(analysis_id)
    if not claim.ids:
        log.debug("analysis %d: already finished or held elsewhere", analysis_id)
        return 0
    try:
        targets = runtime.records.targets(claim)
        results = runtime.analyzer.analyse(targets, runtime.settings.storage.data_dir)
        written = runtime.records.record(claim, runtime.model_id, results)
    except Exception as exc:  # transient or not, the claim must not stay held
        _give_back(self, claim, analysis_id, exc)
        raise
    _log_batch(targets, results)
    return written


@app.task(name=ASSESS_STUDY, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def assess_study(self: Task[Any, Any], assessment_id: int) -> str | None:
    """Assess a stable study and, with ``results.enabled``, make, store and queue its
    Structured Report and Grad-CAM captures."""
    runtime = app.runtime
    table = runtime.records.assessments
    queue = runtime.settings.queue
    claim = table.claim([assessment_id], queue.lease_seconds)
    if not claim.ids:
        return None
    try:
        assessment = runtime.records.assessment(assessment_id, claim)
        if assessment is None or not _record_assessment(assessment, claim):
            return None
    except CatalogUnavailable as exc:
        # The lease runs out if the release cannot be written either; the node then requeues.
        with suppress(CatalogUnavailable):
            table.release(claim.ids, claim, QUEUED, str(exc)[:500])
        raise self.retry(exc=exc, countdown=_backoff(queue.retry_backoff_seconds, self)) from exc
    except Exception as exc:  # a result that cannot be built: retried, then recorded as failed
        reason = f"{type(exc).__name__}: {exc}"[:500]
        log.exception("results of study assessment %d failed", assessment_id)
        if table.attempts(assessment_id) >= queue.max_attempts:
            with runtime.catalog.transaction() as connection:
                table.finish(connection, assessment_id, claim, FAILED, {"reason": reason})
            return None
        table.release(claim.ids, claim, QUEUED, reason)
        raise self.retry(exc=exc, countdown=_backoff(queue.retry_backoff_seconds, self)) from exc
    log.info("study assessment %d: %s", assessment_id, assessment.finding or "no analysed image")
    return assessment.finding


def _record_assessment(assessment: StudyAssessment, claim: Claim) -> bool:
    runtime = app.runtime
    if runtime.settings.results.enabled:
        return runtime.results.make(assessment, claim)
    with runtime.catalog.transaction() as connection:
        return runtime.records.finish_assessment(connection, assessment, claim)


def _give_back(task: Task[Any, Any], claim: Claim, analysis_id: int, exc: Exception) -> None:
    """Release a batch that failed as a whole: the named row is retried with backoff; the
    others go back to the outbox at once (their own messages may be spent); rows that have
    used up their attempts are recorded as failed."""
    runtime = app.runtime
    queue = runtime.settings.queue
    reason = f"{type(exc).__name__}: {exc}"[:500]
    log.warning("analysis batch of %d failed: %s", len(claim.ids), reason)
    try:
        targets = runtime.records.targets(claim)
        spent = [t.analysis_id for t in targets if t.attempts >= queue.max_attempts]
        if spent:
            outcomes = [
                AnalysisOutcome(i, FAILED, f"gave up after {queue.max_attempts} attempts: {reason}")
                for i in spent
            ]
            runtime.records.record(claim, runtime.model_id, outcomes)
        others = [i for i in claim.ids if i != analysis_id and i not in spent]
        runtime.records.analyses.release(others, claim, PENDING, reason)
        if analysis_id in claim.ids and analysis_id not in spent:
            runtime.records.analyses.release([analysis_id], claim, QUEUED, reason)
            raise task.retry(exc=exc, countdown=_backoff(queue.retry_backoff_seconds, task))
    except CatalogUnavailable:
        log.warning(
            "catalog unreachable: the lease of %d analyses will run out and they will be retried",
            len(claim.ids),
        )


def _backoff(base: float, task: Task[Any, Any]) -> float:
    return float(base * 2 ** min(task.request.retries, 10))


def _log_batch(targets: list[AnalysisTarget], results: list[AnalysisResult | AnalysisOutcome]) -> None:
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, AnalysisOutcome):
            log.info("analysis of %s %s: %s", target.sop_instance_uid, result.state, result.reason)
        else:
            log.info(
                "analysis of %s: %s (%.3f)",
                target.sop_instance_uid,
                result.predicted_label,
                result.probabilities[result.predicted_label],
            )
