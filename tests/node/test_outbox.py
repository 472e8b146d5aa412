"""The analysis outbox in the catalog: requests recorded with their instance, published,
claimed under a lease, finished once, recovered when lost (both databases)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select, update

from node.catalog.analyses import AnalysisOutcome, AnalysisRecords, AnalysisResult, ModelRecord
from node.catalog.models import ANALYSES, EMBEDDINGS, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.catalog.work import DONE, FAILED, PENDING, QUEUED, RUNNING, SKIPPED, Claim
from tests.node.test_catalog import header, stored

MODEL = "a" * 64
LABELS = ["normal", "benign", "malignant"]


@pytest.fixture
def records(catalog_url: str) -> Iterator[AnalysisRecords]:
    catalog = Catalog.open(catalog_url)
    records = AnalysisRecords(catalog)
    records.register_model(ModelRecord(MODEL, "cnn4", LABELS, False, {}))
    yield records
    catalog.close()


def states(records: AnalysisRecords) -> list[str]:
    with records.catalog.connection() as connection:
        return list(connection.execute(select(ANALYSES.c.state).order_by(ANALYSES.c.id)).scalars())


def result(analysis_id: int, label: str = "benign", p: float = 0.7) -> AnalysisResult:
    probabilities = dict.fromkeys(LABELS, (1 - p) / 2) | {label: p}
    return AnalysisResult(
        analysis_id,
        label,
        probabilities,
        0,
        None,
        (0, 0, 10, 10),
        np.ones(8, np.float32),
        None,
        None,
        None,
        {},
    )


def claim_all(records: AnalysisRecords, lease: float = 60) -> Claim:
    ids = records.analyses.take_unpublished(1000)
    return records.analyses.claim(ids, lease)


def test_a_stored_image_has_its_request_in_the_same_transaction(records: AnalysisRecords) -> None:
    catalog = records.catalog
    assert catalog.add_instance(replace(header(1), rows=64, columns=64), stored(1), "US", MODEL)
    assert catalog.add_instance(header(2), stored(2), "US", MODEL)  # no Rows: an SR, say
    assert catalog.add_instance(replace(header(3), rows=64, columns=64), stored(3), "US")  # analysis off
    assert states(records) == [PENDING, SKIPPED]


def test_publication_keeps_at_most_max_in_flight_queued(records: AnalysisRecords) -> None:
    for n in range(5):
        records.catalog.add_instance(replace(header(n), rows=8, columns=8), stored(n), "US", MODEL)
    first = records.analyses.take_unpublished(3)
    assert len(first) == 3
    assert records.analyses.take_unpublished(3) == []
    records.analyses.unpublish(first[:1], "broker unreachable")
    assert len(records.analyses.take_unpublished(3)) == 1
    assert states(records).count(QUEUED) == 3


def test_a_claimed_request_is_finished_once_by_its_holder(records: AnalysisRecords) -> None:
    records.catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US", MODEL)
    claim = claim_all(records)
    assert len(claim.ids) == 1
    assert records.analyses.claim(claim.ids, 60).ids == ()  # a duplicate message finds it held
    assert records.record(claim, MODEL, [result(claim.ids[0])]) == 1
    assert states(records) == [DONE]
    assert records.analyses.claim(claim.ids, 60).ids == ()  # ... or finished
    assert records.record(claim, MODEL, [result(claim.ids[0], "malignant")]) == 0
    with records.catalog.connection() as connection:
        assert connection.execute(select(ANALYSES.c.predicted_label)).scalar_one() == "benign"
        assert len(connection.execute(select(EMBEDDINGS.c.id)).all()) == 1


def test_an_expired_lease_passes_the_request_on_and_the_old_holder_cannot_write(
    records: AnalysisRecords,
) -> None:
    records.catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US", MODEL)
    dead = claim_all(records, lease=0.05)
    time.sleep(0.1)
    assert records.analyses.requeue_stale(republish_after=3600) == 1
    assert states(records) == [PENDING]
    alive = claim_all(records)
    assert alive.ids == dead.ids
    assert records.record(dead, MODEL, [result(dead.ids[0], "malignant")]) == 0
    assert records.record(alive, MODEL, [result(alive.ids[0])]) == 1
    with records.catalog.connection() as connection:
        row = connection.execute(select(ANALYSES.c.predicted_label, ANALYSES.c.attempts)).one()
    assert tuple(row) == ("benign", 2)


def test_a_request_published_long_ago_and_never_claimed_is_published_again(records: AnalysisRecords) -> None:
    records.catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US", MODEL)
    records.analyses.take_unpublished(10)
    assert records.analyses.requeue_stale(republish_after=3600) == 0
    time.sleep(0.05)
    assert records.analyses.requeue_stale(republish_after=0.01) == 1
    assert records.analyses.take_unpublished(10) != []


def test_failures_and_skips_are_recorded_with_their_reason_and_can_be_requested_again(
    records: AnalysisRecords,
) -> None:
    for n in (1, 2):
        records.catalog.add_instance(replace(header(n), rows=8, columns=8), stored(n), "US", MODEL)
    claim = claim_all(records)
    outcomes = [
        AnalysisOutcome(claim.ids[0], FAILED, "JPEG 2000: no decoder"),
        AnalysisOutcome(claim.ids[1], SKIPPED, "not an image"),
    ]
    records.record(claim, MODEL, outcomes)
    assert records.failures()[0][0] == "JPEG 2000: no decoder"
    assert records.request_reanalysis(MODEL, study_uid=None, failed_only=True) == 1
    assert states(records) == [PENDING, SKIPPED]


def test_reanalysis_of_a_study_also_requests_what_was_never_analysed(records: AnalysisRecords) -> None:
    catalog = records.catalog
    catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US")  # stored while off
    catalog.add_instance(
        replace(header(2, study="1.2.3", series="1.2.3.1"), rows=8, columns=8), stored(2), "US"
    )
    assert records.request_reanalysis(MODEL, study_uid=header(1).study_instance_uid, failed_only=False) == 1
    assert states(records) == [PENDING]


def age_studies(records: AnalysisRecords, seconds: float) -> None:
    """As if the studies' last instance had come ``seconds`` earlier."""
    earlier = datetime.now(UTC) - timedelta(seconds=seconds)
    with records.catalog.transaction() as connection:
        connection.execute(update(STUDIES).values(updated_at=earlier))


def test_a_stable_study_is_assessed_once_its_analyses_are_finished(records: AnalysisRecords) -> None:
    catalog = records.catalog
    for n in (1, 2):
        catalog.add_instance(replace(header(n), rows=8, columns=8), stored(n), "US", MODEL)
    claim = claim_all(records)
    assert records.request_due_assessments(MODEL, stable_seconds=0) == 0  # analyses unfinished
    records.record(
        claim, MODEL, [result(claim.ids[0], "benign", 0.9), result(claim.ids[1], "malignant", 0.6)]
    )
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 0  # not stable yet
    age_studies(records, 120)
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 1
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 0
    assessment = records.assessments.claim(records.assessments.take_unpublished(10), 60)
    assert records.assess_study(assessment.ids[0], assessment) == "malignant"
    with catalog.connection() as connection:
        row = connection.execute(select(STUDY_ASSESSMENTS)).one()
    assert (row.revision, row.probability, row.analysed_instances, row.state) == (1, 0.6, 2, DONE)

    # A late image makes a new revision, once analysed; the first stays.
    catalog.add_instance(replace(header(3), rows=8, columns=8), stored(3), "US", MODEL)
    age_studies(records, 120)
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 0
    late = claim_all(records)
    records.record(late, MODEL, [result(late.ids[0], "normal", 0.99)])
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 1
    with catalog.connection() as connection:
        revisions = connection.execute(select(STUDY_ASSESSMENTS.c.revision, STUDY_ASSESSMENTS.c.state)).all()
    assert sorted(map(tuple, revisions)) == [(1, DONE), (2, PENDING)]


def test_running_rows_are_not_requested_again_by_reanalysis(records: AnalysisRecords) -> None:
    records.catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US", MODEL)
    claim_all(records)
    assert records.request_reanalysis(MODEL, study_uid=None, failed_only=False) == 0
    assert states(records) == [RUNNING]


def test_a_replaced_instance_is_analysed_again_and_loses_its_old_embedding(records: AnalysisRecords) -> None:
    catalog = records.catalog
    catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US", MODEL)
    claim = claim_all(records)
    records.record(claim, MODEL, [result(claim.ids[0])])
    catalog.replace_instance(replace(header(1), rows=16, columns=16), stored(7), "US", MODEL)
    assert states(records) == [PENDING]
    with catalog.connection() as connection:
        assert connection.execute(select(ANALYSES.c.predicted_label)).scalar_one() is None
        assert connection.execute(select(EMBEDDINGS.c.id)).all() == []


def test_a_study_stored_while_analysis_was_off_is_assessed_after_its_reanalysis(
    records: AnalysisRecords,
) -> None:
    catalog = records.catalog
    catalog.add_instance(replace(header(1), rows=8, columns=8), stored(1), "US")  # analysis off
    age_studies(records, 120)
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 0  # nothing analysed: no report
    assert records.request_reanalysis(MODEL, study_uid=None, failed_only=False) == 1
    claim = claim_all(records)
    records.record(claim, MODEL, [result(claim.ids[0], "malignant", 0.8)])
    age_studies(records, 120)
    assert records.request_due_assessments(MODEL, stable_seconds=60) == 1
