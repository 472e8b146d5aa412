"""Query/Retrieve identifiers translated to SQL over the catalog, and catalog rows back to
identifiers.

Pure translation, no DIMSE and no I/O: :func:`parse_query` reads a C-FIND identifier under
an information model into a :class:`Query`; :meth:`Query.statement` is a SQLAlchemy Core
SELECT that does all the matching (PS3.4 C.2.2.2) in the database, so that matches can be
streamed; :meth:`Query.response` turns one result row into the identifier to send back.
:func:`parse_retrieve` reads a C-MOVE / C-GET identifier (unique keys only) into a
:class:`Selection` of the instances it names.

Matching, per key type: empty value = universal (return the value, match everything);
``*`` / ``?`` = wildcard (SQL ``LIKE``, with ``%`` and ``_`` escaped); ``A-B`` / ``A-`` /
``-B`` on dates and times = inclusive range; a backslash list on UIDs = any of them;
otherwise single value. Person names match case-insensitively (allowed by C.2.2.2.1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.engine import Row

from node.catalog.models import INSTANCES, PATIENTS, SERIES, STUDIES
from node.errors import IdentifierMismatch, UnprocessableQuery
from node.header import UID_PATTERN

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

UTF8 = "ISO_IR 192"
_ESCAPE = "!"
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_LIST_SEPARATOR = ","  # neither CS values nor UIDs hold a comma: a safe separator to aggregate with


class Level(Enum):
    """Query/Retrieve levels, top down; the value is the QueryRetrieveLevel text."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return list(Level).index(self)


class Model(Enum):
    """The Query/Retrieve information models, by the levels they allow."""

    PATIENT_ROOT = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
    STUDY_ROOT = (Level.STUDY, Level.SERIES, Level.IMAGE)

    @classmethod
    def of_sop_class(cls, sop_class_uid: str) -> Model | None:
        """The model of a FIND, MOVE or GET SOP class of Patient or Study Root."""
        if sop_class_uid in (PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET):
            return cls.PATIENT_ROOT
        if sop_class_uid in (STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET):
            return cls.STUDY_ROOT
        return None


class Kind(Enum):
    """How a key's value is matched."""

    TEXT = "text"  # single value or wildcard
    NAME = "name"  # as TEXT, case-insensitive
    UID = "uid"  # single value or list of UIDs
    DATE = "date"  # single value or range
    TIME = "time"  # single value or range
    NUMBER = "number"  # single value


@dataclass(frozen=True)
class Key:
    """A matching key the catalog holds as a column."""

    level: Level
    column: ColumnElement[Any]
    kind: Kind


KEYS: dict[str, Key] = {
    "PatientID": Key(Level.PATIENT, PATIENTS.c.patient_id, Kind.TEXT),
    "IssuerOfPatientID": Key(Level.PATIENT, PATIENTS.c.issuer_of_patient_id, Kind.TEXT),
    "PatientName": Key(Level.PATIENT, PATIENTS.c.patient_name, Kind.NAME),
    "PatientBirthDate": Key(Level.PATIENT, PATIENTS.c.patient_birth_date, Kind.DATE),
    "PatientSex": Key(Level.PATIENT, PATIENTS.c.patient_sex, Kind.TEXT),
    "StudyInstanceUID": Key(Level.STUDY, STUDIES.c.study_instance_uid, Kind.UID),
    "StudyDate": Key(Level.STUDY, STUDIES.c.study_date, Kind.DATE),
    "StudyTime": Key(Level.STUDY, STUDIES.c.study_time, Kind.TIME),
    "AccessionNumber": Key(Level.STUDY, STUDIES.c.accession_number, Kind.TEXT),
    "StudyID": Key(Level.STUDY, STUDIES.c.study_id, Kind.TEXT),
    "StudyDescription": Key(Level.STUDY, STUDIES.c.study_description, Kind.TEXT),
    "ReferringPhysicianName": Key(Level.STUDY, STUDIES.c.referring_physician_name, Kind.NAME),
    "SeriesInstanceUID": Key(Level.SERIES, SERIES.c.series_instance_uid, Kind.UID),
    "Modality": Key(Level.SERIES, SERIES.c.modality, Kind.TEXT),
    "SeriesNumber": Key(Level.SERIES, SERIES.c.series_number, Kind.NUMBER),
    "SeriesDescription": Key(Level.SERIES, SERIES.c.series_description, Kind.TEXT),
    "BodyPartExamined": Key(Level.SERIES, SERIES.c.body_part_examined, Kind.TEXT),
    "Laterality": Key(Level.SERIES, SERIES.c.laterality, Kind.TEXT),
    "SOPInstanceUID": Key(Level.IMAGE, INSTANCES.c.sop_instance_uid, Kind.UID),
    "SOPClassUID": Key(Level.IMAGE, INSTANCES.c.sop_class_uid, Kind.UID),
    "InstanceNumber": Key(Level.IMAGE, INSTANCES.c.instance_number, Kind.NUMBER),
    "ImageLaterality": Key(Level.IMAGE, INSTANCES.c.image_laterality, Kind.TEXT),
    "ViewPosition": Key(Level.IMAGE, INSTANCES.c.view_position, Kind.TEXT),
    "Rows": Key(Level.IMAGE, INSTANCES.c.rows, Kind.NUMBER),
    "Columns": Key(Level.IMAGE, INSTANCES.c.columns, Kind.NUMBER),
    "NumberOfFrames": Key(Level.IMAGE, INSTANCES.c.number_of_frames, Kind.NUMBER),
}

# The unique key of each level: required, single-valued, in a query below that level.
UNIQUE_KEYS: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# The table whose rows are the matches at each level, and how it joins to the level above.
_TABLES = {Level.PATIENT: PATIENTS, Level.STUDY: STUDIES, Level.SERIES: SERIES, Level.IMAGE: INSTANCES}
_PARENT_LINKS = {
    Level.STUDY: STUDIES.c.patient_pk == PATIENTS.c.id,
    Level.SERIES: SERIES.c.study_pk == STUDIES.c.id,
    Level.IMAGE: INSTANCES.c.series_pk == SERIES.c.id,
}


_STUDY_SERIES = SERIES.c.study_pk == STUDIES.c.id
_PATIENT_STUDIES = STUDIES.c.patient_pk == PATIENTS.c.id
_SERIES_OF_STUDIES = SERIES.join(STUDIES, _STUDY_SERIES)
_INSTANCES_OF_SERIES = INSTANCES.join(SERIES, INSTANCES.c.series_pk == SERIES.c.id)


def _count(table: Any, *links: ColumnElement[bool]) -> ColumnElement[Any]:
    return select(func.count()).select_from(table).where(*links).scalar_subquery()


def _listed(column: ColumnElement[Any], table: Any) -> ColumnElement[Any]:
    """Every value of ``column`` among the study's series (or their instances), joined into
    one string, duplicates and all: :func:`_response_value` makes the set."""
    aggregate = func.aggregate_strings(column, _LIST_SEPARATOR)
    return select(aggregate).select_from(table).where(_STUDY_SERIES).scalar_subquery()


# Computed keys (attributes of a level that summarise the levels below), as correlated
# subqueries, selected only when asked for.
COMPUTED: dict[str, tuple[Level, Callable[[], ColumnElement[Any]]]] = {
    "NumberOfPatientRelatedStudies": (Level.PATIENT, lambda: _count(STUDIES, _PATIENT_STUDIES)),
    "NumberOfPatientRelatedSeries": (Level.PATIENT, lambda: _count(_SERIES_OF_STUDIES, _PATIENT_STUDIES)),
    "NumberOfPatientRelatedInstances": (
        Level.PATIENT,
        lambda: _count(_INSTANCES_OF_SERIES.join(STUDIES, _STUDY_SERIES), _PATIENT_STUDIES),
    ),
    "NumberOfStudyRelatedSeries": (Level.STUDY, lambda: _count(SERIES, _STUDY_SERIES)),
    "NumberOfStudyRelatedInstances": (
        Level.STUDY,
        lambda: _count(_INSTANCES_OF_SERIES, _STUDY_SERIES),
    ),
    "ModalitiesInStudy": (Level.STUDY, lambda: _listed(SERIES.c.modality, SERIES)),
    "SOPClassesInStudy": (Level.STUDY, lambda: _listed(INSTANCES.c.sop_class_uid, _INSTANCES_OF_SERIES)),
    "NumberOfSeriesRelatedInstances": (
        Level.SERIES,
        lambda: _count(INSTANCES, INSTANCES.c.series_pk == SERIES.c.id),
    ),
}

# Keys the response always carries, whatever was asked.
_ALWAYS = ("QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet")


@dataclass
class Query:
    """A parsed C-FIND request: its level, the keys it asked for and the conditions on them."""

    level: Level
    requested: list[DataElement]
    conditions: list[ColumnElement[bool]] = field(default_factory=list)
    returned: dict[str, ColumnElement[Any]] = field(default_factory=dict)

    def statement(self) -> Select[Any]:
        """The SELECT of every match, one row per entity at the query level, unordered."""
        columns = [column.label(keyword) for keyword, column in self.returned.items()]
        statement = select(_TABLES[self.level].c.id, *columns).select_from(_joined(self.level))
        return statement.where(*self.conditions)

    def id_column(self) -> ColumnElement[int]:
        """The primary key of the level's rows, the first column of :meth:`statement`."""
        return _TABLES[self.level].c.id

    def response(self, row: Row[Any], retrieve_ae_title: str) -> Dataset:
        """The identifier for one match: every requested key, with its value or empty."""
        values = row._mapping
        identifier = Dataset()
        for element in self.requested:
            keyword = element.keyword
            if keyword in self.returned:
                _set(identifier, element, _response_value(keyword, values[keyword]))
            elif keyword not in _ALWAYS:
                identifier.add(DataElement(element.tag, element.VR, None))
        identifier.QueryRetrieveLevel = self.level.value
        identifier.RetrieveAETitle = retrieve_ae_title
        if any(not str(e.value).isascii() for e in identifier if e.value is not None):
            identifier.SpecificCharacterSet = UTF8
        return identifier


def parse_query(identifier: Dataset, model: Model) -> Query:
    """Read a request identifier; raise :class:`IdentifierMismatch` when it does not fit the
    model's hierarchy, :class:`UnprocessableQuery` when a key's value cannot be matched."""
    level = _level_of(identifier, model)
    for upper in model.value[: model.value.index(level)]:
        _require_unique_key(identifier, upper)
    return query_at_level(identifier, level)


def query_at_level(identifier: Dataset, level: Level) -> Query:
    """The query of ``identifier``'s keys at ``level``, every key a filter, no unique key
    of an upper level required (relational matching): what a similarity query's other
    keys mean. Raises :class:`UnprocessableQuery` as :func:`parse_query` does."""
    requested = [e for e in identifier if e.tag.group != 0 and e.tag.element != 0 and not e.tag.is_private]
    query = Query(level, requested)
    for element in requested:
        keyword = element.keyword
        if keyword in KEYS and KEYS[keyword].level.depth <= level.depth:
            key = KEYS[keyword]
            query.returned[keyword] = key.column
            condition = _condition(key.column, key.kind, _values(element), keyword)
            if condition is not None:
                query.conditions.append(condition)
        elif keyword in COMPUTED and COMPUTED[keyword][0] == level:
            query.returned[keyword] = COMPUTED[keyword][1]()
            query.conditions.extend(_in_study_condition(keyword, _values(element)))
    return query


@dataclass(frozen=True)
class Selection:
    """The instances a C-MOVE or C-GET identifier names: every instance under the entities
    its unique keys match."""

    level: Level
    conditions: tuple[ColumnElement[bool], ...]

    def instances(self) -> Select[Any]:
        """Each selected instance's UID, SOP class, stored transfer syntax and file path, in
        the order the node received them (so that a LIMIT keeps a retrieval to the instances
        it counted, whatever arrives meanwhile)."""
        columns = (
            INSTANCES.c.sop_instance_uid,
            INSTANCES.c.sop_class_uid,
            INSTANCES.c.transfer_syntax_uid,
            INSTANCES.c.file_path,
        )
        statement = select(*columns).select_from(_joined(Level.IMAGE)).where(*self.conditions)
        return statement.order_by(INSTANCES.c.id)

    def composition(self) -> Select[Any]:
        """How many instances are selected, per (SOP class, stored transfer syntax): what a
        C-MOVE must propose to its destination, and the sub-operation count."""
        kinds = (INSTANCES.c.sop_class_uid, INSTANCES.c.transfer_syntax_uid)
        statement = select(*kinds, func.count().label("instances")).select_from(_joined(Level.IMAGE))
        return statement.where(*self.conditions).group_by(*kinds)


def parse_retrieve(identifier: Dataset, model: Model) -> Selection:
    """Read a C-MOVE / C-GET identifier (PS3.4 C.4.2.2.1): the unique key of every level
    above the retrieve level with a single value, and the unique key of the retrieve level
    itself with one value or, for UIDs, a list of them. Other keys are ignored. Raises as
    :func:`parse_query` does."""
    level = _level_of(identifier, model)
    conditions = [
        _unique_key_condition(identifier, upper) for upper in model.value[: model.value.index(level)]
    ]
    keyword = UNIQUE_KEYS[level]
    values = _values(identifier[keyword]) if keyword in identifier else []
    if not values or any(not value or _has_wildcard(value) for value in values):
        raise IdentifierMismatch(f"{keyword} must name what to retrieve at {level.value} level")
    key = KEYS[keyword]
    condition = _condition(key.column, key.kind, values, keyword)
    assert condition is not None  # only an empty or universal value has no condition
    return Selection(level, (*conditions, condition))


def _level_of(identifier: Dataset, model: Model) -> Level:
    text = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    if not text:
        raise IdentifierMismatch("QueryRetrieveLevel (0008,0052) is missing")
    level = next((lv for lv in Level if lv.value == text), None)
    if level is None or level not in model.value:
        raise IdentifierMismatch(f"QueryRetrieveLevel {text[:16]!r} is not a level of this model")
    return level


def _require_unique_key(identifier: Dataset, level: Level) -> str:
    """The single value of ``level``'s unique key, required in an identifier below that level."""
    keyword = UNIQUE_KEYS[level]
    values = _values(identifier[keyword]) if keyword in identifier else []
    if len(values) != 1 or not values[0] or _has_wildcard(values[0]):
        raise IdentifierMismatch(f"{keyword} must hold a single value below {level.value} level")
    return values[0]


def _unique_key_condition(identifier: Dataset, level: Level) -> ColumnElement[bool]:
    key = KEYS[UNIQUE_KEYS[level]]
    value = _require_unique_key(identifier, level)
    condition = _condition(key.column, key.kind, [value], UNIQUE_KEYS[level])
    assert condition is not None  # only an empty or universal value has no condition
    return condition


def _values(element: DataElement) -> list[str]:
    """The element's values as text: one for a single value, none for an empty one."""
    value = element.value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value]
    if isinstance(value, bytes):
        raise UnprocessableQuery(f"{element.keyword or element.tag} has a value the node cannot read")
    text = str(value).strip()
    return [text] if text else []


def _condition(
    column: ColumnElement[Any], kind: Kind, values: Sequence[str], keyword: str
) -> ColumnElement[bool] | None:
    """The WHERE condition for one key, or None for universal matching."""
    if not values or values == ["*"]:
        return None
    if kind is Kind.UID:
        return _uid_list(column, values, keyword)
    if len(values) > 1:
        raise UnprocessableQuery(f"{keyword} holds several values; only UIDs may be matched as a list")
    value = values[0]
    if kind is Kind.DATE or kind is Kind.TIME:
        return _date_or_time(column, value, kind, keyword)
    if kind is Kind.NUMBER:
        if not re.fullmatch(r"[+-]?\d{1,10}", value):
            raise UnprocessableQuery(f"{keyword} must be a single integer, not {value[:16]!r}")
        return column == int(value)
    return _text(column, value, case_insensitive=kind is Kind.NAME)


def _text(column: ColumnElement[Any], value: str, *, case_insensitive: bool) -> ColumnElement[bool]:
    """Single value matching, or wildcard matching when the value holds ``*`` or ``?``."""
    if not _has_wildcard(value):
        if case_insensitive:  # SQLite's lower() folds ASCII only: the exact value always matches
            return or_(column == value, func.lower(column) == value.lower())
        return column == value
    pattern = like_pattern(value)
    if case_insensitive:
        return column.ilike(pattern, escape=_ESCAPE)
    return column.like(pattern, escape=_ESCAPE)


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern: ``*`` → ``%``, ``?`` → ``_``, and the
    characters LIKE would otherwise read as wildcards (``%``, ``_``, the escape) escaped."""
    escaped = value.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _uid_list(column: ColumnElement[Any], values: Sequence[str], keyword: str) -> ColumnElement[bool]:
    for value in values:
        if not UID_PATTERN.fullmatch(value) or len(value) > 64:
            raise UnprocessableQuery(f"{keyword} holds a value that is not a UID: {value[:64]!r}")
    if len(values) == 1:
        return column == values[0]
    return column.in_(list(values))


def _date_or_time(column: ColumnElement[Any], value: str, kind: Kind, keyword: str) -> ColumnElement[bool]:
    """Single value or inclusive range (``A-B``, ``A-``, ``-B``) on DICOM DA / TM strings,
    which order as text. An empty stored value matches no range."""
    form = _DATE if kind is Kind.DATE else _TIME
    low, dash, high = value.partition("-")
    for bound in (low, high):
        if bound and not form.fullmatch(bound):
            raise UnprocessableQuery(f"{keyword} {value[:32]!r} is not a {kind.value} or a range of them")
    if not dash:
        return column == low
    if not low and not high:
        raise UnprocessableQuery(f"{keyword} range {value!r} has neither bound")
    conditions: list[ColumnElement[bool]] = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= (_end_of_time(high) if kind is Kind.TIME else high))
    return and_(*conditions)


def _end_of_time(value: str) -> str:
    """The last instant a partial time stands for: ``10`` → ``105959.999999``, so that an
    upper bound includes the whole hour (or minute, or second) it names."""
    whole, _, fraction = value.partition(".")
    return (whole + "5959"[len(whole) - 2 :]) + "." + fraction.ljust(6, "9")


def _in_study_condition(keyword: str, values: Sequence[str]) -> list[ColumnElement[bool]]:
    """A study matches ModalitiesInStudy (SOPClassesInStudy) when any of its series (instances)
    has any of the values; the other computed keys are only returned."""
    if not values or values == ["*"]:
        return []
    if keyword == "ModalitiesInStudy":
        matches = [_text(SERIES.c.modality, value, case_insensitive=False) for value in values]
        return [exists().where(_STUDY_SERIES, or_(*matches))]
    if keyword == "SOPClassesInStudy":
        in_list = _uid_list(INSTANCES.c.sop_class_uid, values, keyword)
        return [exists().select_from(_INSTANCES_OF_SERIES).where(_STUDY_SERIES, in_list)]
    return []


def _joined(level: Level) -> Any:
    """The level's table joined to every level above it."""
    joined: Any = PATIENTS
    for lower in list(Level)[1 : level.depth + 1]:
        joined = joined.join(_TABLES[lower], _PARENT_LINKS[lower])
    return joined


def _response_value(keyword: str, value: Any) -> Any:
    if keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
        return sorted(set(filter(None, (value or "").split(_LIST_SEPARATOR))))
    return value


def _set(identifier: Dataset, requested: DataElement, value: Any) -> None:
    vr = dictionary_VR(requested.tag)
    if value is None or value == "":
        value = None
    elif vr in ("IS", "US", "UL") and not isinstance(value, list):
        value = int(value)
    identifier.add(DataElement(requested.tag, vr, value))
