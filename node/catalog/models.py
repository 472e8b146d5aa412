"""The catalog's tables: the DICOM information model as the node holds it.

Patient → study → series → instance, each with the keys Query/Retrieve matches on,
indexed. Attribute text is stored as received (decoded with its character set);
DA / TM values stay in their DICOM string forms, which sort and range-match as text.
Any change here comes with an Alembic revision in ``node/catalog/migrations``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
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


# The tables as Core objects (typed Table), for statements built without the ORM.
PATIENTS = Base.metadata.tables["patients"]
STUDIES = Base.metadata.tables["studies"]
SERIES = Base.metadata.tables["series"]
INSTANCES = Base.metadata.tables["instances"]
