"""The catalog's tables: the DICOM information model as the node holds it.

Patient → study → series → instance, each with the keys Query/Retrieve matches on,
indexed. Attribute text is stored as received (decoded with its character set);
DA / TM values stay in their DICOM string forms, which sort and range-match as text.
Any change here comes with an Alembic revision in ``node/catalog/migrations``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String, index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String)
    patient_name: Mapped[str] = mapped_column(String, index=True)
    patient_birth_date: Mapped[str] = mapped_column(String)
    patient_sex: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String, index=True)
    study_time: Mapped[str] = mapped_column(String)
    accession_number: Mapped[str] = mapped_column(String, index=True)
    study_id: Mapped[str] = mapped_column(String)
    study_description: Mapped[str] = mapped_column(String)
    referring_physician_name: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the last instance arrived: study completion waits for this to age.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # Set by every new instance, cleared when the study's assessment is requested.
    assessment_due: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String, index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(String)
    body_part_examined: Mapped[str] = mapped_column(String)
    laterality: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_received_at", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    image_laterality: Mapped[str] = mapped_column(String)
    view_position: Mapped[str] = mapped_column(String)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    file_path: Mapped[str] = mapped_column(String)
    file_size: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str] = mapped_column(String)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


MODEL_ID = String(64)  # sha256 hex of the bundle file


class WorkItem:
    """The columns of a unit of work that is its own outbox entry (DESIGN.md invariants).

    ``pending`` (recorded, not yet published) → ``queued`` (published to the broker)
    → ``running`` (claimed by one worker, under a lease) → ``done``, ``failed`` or
    ``skipped``. A lost message or a dead worker leaves a stale ``queued`` or ``running``
    row that the node turns back to ``pending``; the claim token makes sure only the
    worker holding the lease writes the result.
    """

    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Model(Base):
    """A model bundle the node has analysed with: what its results mean."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(MODEL_ID, unique=True)
    architecture: Mapped[str] = mapped_column(String)
    labels: Mapped[list[str]] = mapped_column(JSON)
    clinical_use: Mapped[bool] = mapped_column(Boolean)
    description: Mapped[dict[str, Any]] = mapped_column(JSON)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Analysis(WorkItem, Base):
    """The analysis of one instance by one model: request, state and results in one row."""

    __tablename__ = "analyses"
    __table_args__ = (
        UniqueConstraint("instance_pk", "model_id"),
        Index("ix_analyses_state_published_at", "state", "published_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_id: Mapped[str] = mapped_column(MODEL_ID)
    predicted_label: Mapped[str | None] = mapped_column(String)
    # {label: probability} of the reported frame
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    frame_index: Mapped[int | None] = mapped_column(Integer)
    # [{frame, probabilities}] when several frames were analysed
    frames: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # (top, left, bottom, right) of the analysed region in the frame
    crop: Mapped[list[int] | None] = mapped_column(JSON)
    # Grad-CAM: uint8 heatmap_size x heatmap_size, zlib-compressed, over the crop
    heatmap: Mapped[bytes | None] = mapped_column(LargeBinary)
    heatmap_size: Mapped[int | None] = mapped_column(Integer)
    heatmap_label: Mapped[str | None] = mapped_column(String)
    # seconds per stage: decode, preprocess, model, gradcam, …
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)


class Embedding(Base):
    """The embedding of one instance by one model; ids grow as they are written, so the
    similarity index can follow the table by high-water mark."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("instance_pk", "model_id"),
        Index("ix_embeddings_model_id_id", "model_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_id: Mapped[str] = mapped_column(MODEL_ID)
    dimension: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StudyAssessment(WorkItem, Base):
    """One revision of a study's assessment by one model, made when the study is stable.

    A study that grows after its assessment gets a new revision; earlier ones stay (the
    results issue lists them as predecessors of the new report).
    """

    __tablename__ = "study_assessments"
    __table_args__ = (UniqueConstraint("study_pk", "model_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_id: Mapped[str] = mapped_column(MODEL_ID)
    revision: Mapped[int] = mapped_column(Integer)
    finding: Mapped[str | None] = mapped_column(String)
    probability: Mapped[float | None] = mapped_column(Float)
    source_instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    analysed_instances: Mapped[int | None] = mapped_column(Integer)


class Result(Base):
    """An object Precedent derived and stored (an SR, a Grad-CAM capture): what it was
    made from. Derived instances are never analysed themselves."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "report" or "gradcam"
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_id: Mapped[str] = mapped_column(MODEL_ID)
    assessment_pk: Mapped[int | None] = mapped_column(ForeignKey("study_assessments.id"))
    source_instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Delivery(Base):
    """One stored object to send to one destination: the destination's persistent queue.

    ``pending`` (due at ``next_attempt_at``) → ``running`` (claimed, under a lease) →
    ``done`` (the destination answered Success or a Warning) or ``failed`` (it refused
    the object; its status is kept). A destination that cannot be reached leaves the row
    pending, with a later ``next_attempt_at``, for as long as it takes.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("instance_pk", "destination"),
        Index("ix_deliveries_destination_state_next", "destination", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[int | None] = mapped_column(Integer)  # the destination's DIMSE status
    reason: Mapped[str] = mapped_column(Text, default="")
    claim_token: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """One entry of the audit trail (:mod:`node.catalog.audit`): a request a DICOM peer
    made (actor ``dicom``) or a ``precedent`` command an administrator ran (``admin``).

    Rows are only ever added. Ids grow in commit order and are never reused (AUTOINCREMENT
    on SQLite, a sequence on PostgreSQL), so an export read by id can be resumed, and a gap
    means rows were removed. ``host`` tells apart the nodes that share one catalog.
    """

    __tablename__ = "audit_events"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(16))  # "dicom" or "admin"
    action: Mapped[str] = mapped_column(String(64))  # store, find, …, or the command's name
    calling_ae: Mapped[str] = mapped_column(String)
    called_ae: Mapped[str] = mapped_column(String)
    address: Mapped[str] = mapped_column(String)
    user: Mapped[str] = mapped_column(String)  # the OS user of an admin command
    host: Mapped[str] = mapped_column(String)
    status: Mapped[int] = mapped_column(Integer)  # DIMSE status, or a command's exit code
    outcome: Mapped[str] = mapped_column(String(16))  # success, warning, failure, cancelled, rejected
    subject: Mapped[dict[str, Any]] = mapped_column(JSON)  # what was asked for
    count: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)


# The tables as Core objects (typed Table), for statements built without the ORM.
PATIENTS = Base.metadata.tables["patients"]
STUDIES = Base.metadata.tables["studies"]
SERIES = Base.metadata.tables["series"]
INSTANCES = Base.metadata.tables["instances"]
MODELS = Base.metadata.tables["models"]
ANALYSES = Base.metadata.tables["analyses"]
EMBEDDINGS = Base.metadata.tables["embeddings"]
STUDY_ASSESSMENTS = Base.metadata.tables["study_assessments"]
RESULTS = Base.metadata.tables["results"]
DELIVERIES = Base.metadata.tables["deliveries"]
AUDIT_EVENTS = Base.metadata.tables["audit_events"]
