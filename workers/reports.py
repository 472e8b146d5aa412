"""The study's Structured Report: what the model found, image by image and for the study.

A Comprehensive 3D SR holding a TID 1500 Measurement Report, built with highdicom, so that any
PACS stores it and any SR-aware viewer shows it next to the images it describes:

- observation context: the model as a device observer (TID 1004), and in every measurement
  group the algorithm that made it (TID 4019: name, version = the first 12 characters of the
  model id, parameters = the full model id and the labels);
- procedure reported: chosen from the modalities of the analysed images;
- image library (TID 1600): every analysed image;
- one measurement group (TID 1501) per analysed image (or frame): the finding as a coded
  qualitative evaluation, the probability of every label, the source image and its Grad-CAM
  secondary capture;
- one measurement group for the study assessment (the finding the caller chose, with its
  probability and the image it came from), and one per similar earlier study (its finding,
  embedding distance, Study Instance UID, accession number and date);
- for a model that is not for clinical use, the sentence "Not for clinical use: <reason>" as a
  TEXT evaluation of the whole report (TID 1500 rows 12 and 14), "NOT FOR CLINICAL USE" in the
  series description (which every PACS lists), and Content Qualification RESEARCH.

The builder is pure: data in, dataset out, nothing read or written. Its UIDs, dates and times
come only from its inputs (``workers.derived_uids``), so the same inputs give the same object
byte for byte and a PACS that receives it twice keeps one copy (DESIGN.md, "work is
idempotent"). Codes come from the DICOM standard's context groups and SNOMED CT; the private
scheme ``99PRECEDENT`` holds only what neither has (see :data:`CODES_USED`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import NamedTuple

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID

from workers import software_version
from workers.derived_uids import derived_uid

__all__ = [
    "CODES_USED",
    "PRIVATE_SCHEME",
    "CodeUse",
    "GradcamCapture",
    "ImageFinding",
    "ReportError",
    "ReportModel",
    "SimilarStudy",
    "StudyReport",
    "build_report",
]

MANUFACTURER = "Precedent"
PRIVATE_SCHEME = "99PRECEDENT"


class ReportError(ValueError):
    """The inputs cannot make a valid report; the message says which input and why."""


class CodeUse(NamedTuple):
    """One code this module writes: what for, the code, and where the code comes from."""

    purpose: str
    code: Code
    source: str


# --- Codes -------------------------------------------------------------------------------------------

# Labels of three-class models (BUSI: normal / benign / malignant; binary models use a subset).
_FINDING = Code("121071", "DCM", "Finding")
_NORMAL = Code("17621005", "SCT", "Normal")
_BENIGN = Code("30807003", "SCT", "Benign")
_MALIGNANT = Code("21594007", "SCT", "Malignant")

# Labels of BI-RADS models: DCM "Assessment Category" with CID 6027 "Assessment from BI-RADS",
# as TID 4203 (Breast Imaging Assessment) pairs them. Meanings are CID 6027's own.
_ASSESSMENT_CATEGORY = Code("111005", "DCM", "Assessment Category")
_BIRADS: dict[str, Code] = {
    "0": Code("397138000", "SCT", "0 - Incomplete - Need additional imaging evaluation +/- priors"),
    "1": Code("397140005", "SCT", "1 - Negative"),
    "2": Code("397141009", "SCT", "2 - Benign"),
    "3": Code("397143007", "SCT", "3 - Probably Benign"),
    "4": Code("397144001", "SCT", "4 - Suspicious"),
    "4A": Code("MA.II.A.5.4A", "BI", "4A - Low suspicion", scheme_version="4.0"),
    "4B": Code("MA.II.A.5.4B", "BI", "4B - Intermediate suspicion", scheme_version="4.0"),
    "4C": Code("MA.II.A.5.4C", "BI", "4C - Moderate suspicion", scheme_version="4.0"),
    "5": Code("397145000", "SCT", "5 - Highly suggestive of malignancy"),
    "6": Code("MA.II.A.5.6", "BI", "6 - Known biopsy proven malignancy", scheme_version="4.0"),
}

_ULTRASONOGRAPHY_OF_BREAST = Code("47079000", "SCT", "Ultrasonography of breast")
_MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
_MRI_OF_BREAST = Code("241615005", "SCT", "MRI of breast")
_IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
_PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "US": _ULTRASONOGRAPHY_OF_BREAST,
    "MG": _MAMMOGRAPHY,
    "MR": _MRI_OF_BREAST,
}

_PROBABILITY = Code("122157", "DCM", "Probability")
_NO_UNITS = Code("1", "UCUM", "no units")
_VISUAL_EXPLANATION = Code("130401", "DCM", "Visual explanation")
_DERIVATION = Code("121401", "DCM", "Derivation")
_GRADCAM = Code("130403", "DCM", "Gradient-weighted class activation")
_STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
_ACCESSION_NUMBER = Code("121022", "DCM", "Accession Number")
_STUDY_DATE = Code("111060", "DCM", "Study Date")
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_COMMENT = Code("121106", "DCM", "Comment")
_EMBEDDING_DISTANCE = Code("EMBED-DISTANCE", PRIVATE_SCHEME, "Embedding distance")

CODES_USED: tuple[CodeUse, ...] = (
    CodeUse("concept of a three-class finding", _FINDING, "TID 1501 row 'Finding'"),
    CodeUse("finding: normal", _NORMAL, "SNOMED CT; CID 222 Normality"),
    CodeUse("finding: benign", _BENIGN, "SNOMED CT; CID 6063 Interventional Procedure Result"),
    CodeUse("finding: malignant", _MALIGNANT, "SNOMED CT; CID 6063 Interventional Procedure Result"),
    CodeUse("concept of a BI-RADS finding", _ASSESSMENT_CATEGORY, "DCM; TID 4203 Breast Imaging Assessment"),
    *(
        CodeUse(f"finding: BI-RADS {category}", code, "CID 6027 Assessment from BI-RADS")
        for category, code in _BIRADS.items()
    ),
    CodeUse("procedure: breast ultrasound", _ULTRASONOGRAPHY_OF_BREAST, "SNOMED CT; CID 6050"),
    CodeUse("procedure: mammography", _MAMMOGRAPHY, "SNOMED CT; CID 6058, CID 10005"),
    CodeUse("procedure: breast MRI", _MRI_OF_BREAST, "SNOMED CT; CID 6050"),
    CodeUse("procedure: any other modality", _IMAGING_PROCEDURE, "SNOMED CT; CID 100"),
    CodeUse("probability of a label", _PROBABILITY, "DCM"),
    CodeUse("unit of a probability", _NO_UNITS, "UCUM"),
    CodeUse("reference to a Grad-CAM capture", _VISUAL_EXPLANATION, "DCM"),
    CodeUse("how the capture was derived", _GRADCAM, "DCM; CID 217, CID 7180"),
    CodeUse("similar study: its UID", _STUDY_INSTANCE_UID, "DCM"),
    CodeUse("similar study: its accession number", _ACCESSION_NUMBER, "DCM"),
    CodeUse("similar study: its date", _STUDY_DATE, "DCM"),
    CodeUse("similar study: distance between embeddings", _EMBEDDING_DISTANCE, "private: no standard code"),
    CodeUse("not-for-clinical-use sentence", _COMMENT, "DCM; in TID 1500 row 12"),
)


# --- Inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcamCapture:
    """The Grad-CAM secondary capture of one analysed image, which the report references by UID.

    ``label`` is the class whose evidence the heatmap shows (the predicted one or a configured
    one). The series UID is needed because every referenced instance is listed as evidence.
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    label: str


@dataclass(frozen=True)
class ImageFinding:
    """What the model said about one analysed image, or one frame of a multi-frame image.

    ``source`` is the image's header (pixel data not needed); ``frame_number`` is 1-based and
    only for multi-frame sources; ``probabilities`` holds every label of the model.
    """

    source: Dataset
    frame_number: int | None
    finding: str
    probabilities: Mapping[str, float]
    gradcam: GradcamCapture | None


@dataclass(frozen=True)
class SimilarStudy:
    """One of the earlier studies most similar to this one; ``study_date`` is DICOM DA or ''."""

    study_instance_uid: str
    accession_number: str
    study_date: str
    finding: str | None
    distance: float


@dataclass(frozen=True)
class ReportModel:
    """The model bundle that made the findings; ``model_id`` is the hash of its file."""

    model_id: str
    architecture: str
    labels: Sequence[str]
    clinical_use: bool
    not_clinical_reason: str = ""


@dataclass(frozen=True)
class StudyReport:
    """Everything one revision of a study's report says.

    ``revision`` counts from 1 and becomes the Instance Number; ``predecessors`` are the
    earlier revisions' SR datasets; ``made_at`` dates the content (never the clock), so a rerun
    makes the same object. The assessment names one of ``findings`` by SOP Instance UID (and
    frame number for multi-frame sources). ``similar`` comes most similar first.
    """

    model: ReportModel
    findings: Sequence[ImageFinding]
    assessment_finding: str
    assessment_probability: float
    assessment_source_uid: str
    made_at: datetime
    revision: int = 1
    similar: Sequence[SimilarStudy] = ()
    predecessors: Sequence[Dataset] = ()
    assessment_frame_number: int | None = None
    series_number: int = 9001


# --- Building ----------------------------------------------------------------------------------------


def build_report(report: StudyReport) -> hd.sr.Comprehensive3DSR:
    """The study's Comprehensive 3D SR; raises :class:`ReportError` for inconsistent inputs."""
    _check_report(report)
    labels = _LabelCodes.for_labels(report.model.labels)
    study_uid = _study_uid(report.findings)
    groups = [
        *(
            _image_group(f, i, len(report.findings), labels, report.model)
            for i, f in enumerate(report.findings, start=1)
        ),
        _assessment_group(report, labels, study_uid),
        *(
            _similar_group(s, rank, labels, study_uid, report.model)
            for rank, s in enumerate(report.similar, start=1)
        ),
    ]
    measurement_report = _measurement_report(report, groups)
    if not report.model.clinical_use:
        _add_report_comment(measurement_report, _not_clinical_sentence(report.model))
    return _document(report, measurement_report, study_uid)


def _measurement_report(
    report: StudyReport, groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations]
) -> hd.sr.MeasurementReport:
    """TID 1500 with the image library; highdicom's library entries need modality-specific
    attributes (e.g. Imager Pixel Spacing of a mammogram), so their absence is named here."""
    try:
        return hd.sr.MeasurementReport(
            observation_context=_observation_context(report.model),
            procedure_reported=_procedures(report.findings),
            imaging_measurements=groups,
            referenced_images=_unique_sources(report.findings),
        )
    except AttributeError as error:
        raise ReportError(f"an analysed image lacks what its image library entry needs: {error}") from error


def _document(
    report: StudyReport, content: hd.sr.MeasurementReport, study_uid: str
) -> hd.sr.Comprehensive3DSR:
    """Wrap the content in the SR object, with every date and time taken from ``made_at``."""
    model = report.model
    made_at = report.made_at
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(report.findings),
        content=content[0],
        series_instance_uid=derived_uid("sr-series", study_uid, model.model_id),
        series_number=report.series_number,
        sop_instance_uid=_sop_instance_uid(report, study_uid),
        instance_number=report.revision,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.architecture,
        software_versions=software_version(),
        series_description=_series_description(model),
        is_complete=True,
        is_final=False,
        previous_versions=list(report.predecessors) or None,
        content_date=made_at.date(),
        content_time=made_at.time(),
        specific_character_set="ISO_IR 192",
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="Precedent private codes",
                responsible_organization=MANUFACTURER,
            )
        ],
        content_qualification="PRODUCT" if model.clinical_use else "RESEARCH",
    )
    _stamp(sr, made_at)
    return sr


def _stamp(sr: Dataset, made_at: datetime) -> None:
    """Replace the clock readings highdicom takes by ``made_at``, so reruns are identical."""
    sr.InstanceCreationDate = made_at.strftime("%Y%m%d")
    sr.InstanceCreationTime = made_at.strftime("%H%M%S.%f")
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = made_at.strftime("%Y%m%d%H%M%S.%f")


# --- Checks --------------------------------------------------------------------------------------


def _check_report(report: StudyReport) -> None:
    """Refuse inputs that would make a report that lies or that highdicom would refuse obscurely."""
    if not report.findings:
        raise ReportError("a report needs at least one analysed image")
    if report.revision < 1:
        raise ReportError(f"revision counts from 1, got {report.revision}")
    _check_model(report.model)
    study_uid = _study_uid(report.findings)
    for finding in report.findings:
        _check_finding(finding, report.model)
    _check_unique("analysed image", [_image_key(f.source, f.frame_number) for f in report.findings])
    for similar in report.similar:
        _check_similar(similar, report.model)
    _check_unique("similar study", [s.study_instance_uid for s in report.similar])
    _check_assessment(report)
    this_uid = _sop_instance_uid(report, study_uid)
    if any(str(p.SOPInstanceUID) == this_uid for p in report.predecessors):
        raise ReportError(f"revision {report.revision} lists itself as its own predecessor")


def _check_model(model: ReportModel) -> None:
    """Labels the report can code, and a reason wherever the model is not for clinical use."""
    if not model.labels:
        raise ReportError(f"model {model.model_id} has no labels")
    codes = _LabelCodes.for_labels(model.labels).values
    if len(set(codes.values())) != len(model.labels):
        raise ReportError(f"labels {list(model.labels)} name the same category more than once")
    if not model.clinical_use and not model.not_clinical_reason.strip():
        raise ReportError(f"model {model.model_id} is not for clinical use but gives no reason")


def _study_uid(findings: Sequence[ImageFinding]) -> str:
    """The one study all analysed images belong to: a report describes one study."""
    studies = sorted({str(f.source.StudyInstanceUID) for f in findings})
    if len(studies) != 1:
        raise ReportError(f"findings come from {len(studies)} studies ({', '.join(studies)})")
    return studies[0]


def _check_unique(what: str, keys: Sequence[str]) -> None:
    """Each group has its own tracking UID, derived from its key: a repeated key would repeat it."""
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ReportError(f"{what} listed more than once: {', '.join(repeated)}")


def _image_key(source: Dataset, frame_number: int | None) -> str:
    uid = str(source.SOPInstanceUID)
    return uid if frame_number is None else f"{uid} frame {frame_number}"


def _check_assessment(report: StudyReport) -> None:
    if report.assessment_finding not in report.model.labels:
        raise ReportError(f"assessment {report.assessment_finding!r} is not a label of the model")
    _check_probability("assessment probability", report.assessment_probability)
    _assessment_source(report)


def _sop_instance_uid(report: StudyReport, study_uid: str) -> str:
    """One instance per study, model and revision: a rerun of a revision makes the same one."""
    return derived_uid("sr", study_uid, report.model.model_id, str(report.revision))


def _check_finding(finding: ImageFinding, model: ReportModel) -> None:
    """One image's finding must use the model's labels, give a probability for each, and
    reference a frame only where the source has frames."""
    uid = str(finding.source.SOPInstanceUID)
    if finding.finding not in model.labels:
        raise ReportError(f"finding {finding.finding!r} of image {uid} is not a label of the model")
    if set(finding.probabilities) != set(model.labels):
        raise ReportError(
            f"image {uid} has probabilities for {sorted(finding.probabilities)}, "
            f"the model's labels are {list(model.labels)}"
        )
    for label, probability in finding.probabilities.items():
        _check_probability(f"probability of {label!r} for image {uid}", probability)
    frames = int(finding.source.get("NumberOfFrames", 1) or 1)
    if finding.frame_number is not None and not 1 <= finding.frame_number <= frames:
        raise ReportError(f"frame {finding.frame_number} of image {uid}, which has {frames} frame(s)")
    if finding.gradcam is not None and finding.gradcam.label not in model.labels:
        raise ReportError(f"Grad-CAM of image {uid} explains {finding.gradcam.label!r}, not a label")


def _check_similar(similar: SimilarStudy, model: ReportModel) -> None:
    """A similar study's finding, distance and date must be something the report can encode."""
    uid = similar.study_instance_uid
    if similar.finding is not None and similar.finding not in model.labels:
        raise ReportError(f"similar study {uid} has finding {similar.finding!r}, not a label of the model")
    if not math.isfinite(similar.distance) or similar.distance < 0:
        raise ReportError(f"similar study {uid} has distance {similar.distance}")
    if similar.study_date and _parse_da(similar.study_date) is None:
        raise ReportError(f"similar study {uid} has study date {similar.study_date!r}, not YYYYMMDD")


def _check_probability(what: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ReportError(f"{what} is {value}, not in [0, 1]")


def _parse_da(value: str) -> date | None:
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        return None


# --- Label codes ---------------------------------------------------------------------------------


_BIRADS_LABEL = re.compile(r"^(?:bi-?rads)?[\s_:-]*([0-6])([abc])?$", re.IGNORECASE)


@dataclass(frozen=True)
class _LabelCodes:
    """How a model's labels are coded: one concept name, one coded value per label."""

    concept: Code
    values: Mapping[str, Code]

    @classmethod
    def for_labels(cls, labels: Sequence[str]) -> _LabelCodes:
        """Three-class (normal / benign / malignant, or a subset) or BI-RADS labels; others have no
        standard code and are refused rather than invented."""
        three_class = {"normal": _NORMAL, "benign": _BENIGN, "malignant": _MALIGNANT}
        if all(label.strip().lower() in three_class for label in labels):
            return cls(_FINDING, {label: three_class[label.strip().lower()] for label in labels})
        birads = {label: _birads_code(label) for label in labels}
        if all(code is not None for code in birads.values()):
            return cls(_ASSESSMENT_CATEGORY, {k: v for k, v in birads.items() if v is not None})
        raise ReportError(
            f"labels {list(labels)} are neither normal/benign/malignant nor BI-RADS categories: "
            "no standard code to report them with"
        )

    def code(self, label: str) -> Code:
        return self.values[label]


def _birads_code(label: str) -> Code | None:
    """The CID 6027 code of a label such as 'BI-RADS 4A', 'birads_3' or '5'; None if it is not one."""
    match = _BIRADS_LABEL.match(label.strip())
    if match is None:
        return None
    category = match.group(1) + (match.group(2) or "").upper()
    return _BIRADS.get(category)


# --- Content -------------------------------------------------------------------------------------


def _observation_context(model: ReportModel) -> hd.sr.ObservationContext:
    """The model as the device observer (TID 1004), identified by a UID derived from its id."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", model.model_id),
        name=_algorithm_name(model),
        manufacturer_name=MANUFACTURER,
        model_name=model.architecture,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(Code("121007", "DCM", "Device")),
            observer_identifying_attributes=device,
        )
    )


def _algorithm(model: ReportModel) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the version is the model id's first 12 characters, the full id a parameter."""
    return hd.sr.AlgorithmIdentification(
        name=_algorithm_name(model),
        version=model.model_id[:12],
        parameters=[f"model id {model.model_id}", f"labels {', '.join(model.labels)}"],
        manufacturer=MANUFACTURER,
    )


def _algorithm_name(model: ReportModel) -> str:
    return f"{MANUFACTURER} {model.architecture}"


def _procedures(findings: Sequence[ImageFinding]) -> list[Code]:
    """One procedure per modality among the sources, in the order they first appear."""
    modalities = dict.fromkeys(str(f.source.get("Modality", "")) for f in findings)
    return list(dict.fromkeys(_PROCEDURE_BY_MODALITY.get(m, _IMAGING_PROCEDURE) for m in modalities))


def _image_group(
    finding: ImageFinding,
    index: int,
    count: int,
    labels: _LabelCodes,
    model: ReportModel,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: finding, every label's probability, source image, Grad-CAM."""
    source = finding.source
    uid = str(source.SOPInstanceUID)
    frame = "" if finding.frame_number is None else f", frame {finding.frame_number}"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("sr-tracking", uid, str(finding.frame_number or 0), model.model_id),
            identifier=f"Image {index} of {count}{frame}",
        ),
        algorithm_id=_algorithm(model),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(labels.concept, labels.code(finding.finding))],
        measurements=[_probability(finding.probabilities[label], label, labels) for label in model.labels],
        source_images=[_source_reference(finding)],
    )
    if finding.gradcam is not None:
        group[0].ContentSequence.append(_gradcam_reference(finding.gradcam, labels))
    return group


def _source_reference(finding: ImageFinding) -> hd.sr.SourceImageForMeasurementGroup:
    """IMAGE 'Source of Measurement' for the analysed image (and frame); highdicom checks that
    the source is an image and that a frame is given only for a multi-frame SOP class."""
    frames = None if finding.frame_number is None else [finding.frame_number]
    try:
        return hd.sr.SourceImageForMeasurementGroup.from_source_image(finding.source, frames)
    except (TypeError, ValueError) as error:
        uid = finding.source.SOPInstanceUID
        raise ReportError(f"image {uid} cannot be referenced as analysed: {error}") from error


def _probability(value: float, label: str, labels: _LabelCodes) -> hd.sr.Measurement:
    """TID 300 'Probability' (no units), modified by the label it is the probability of."""
    measurement = hd.sr.Measurement(name=_PROBABILITY, value=value, unit=_NO_UNITS)
    item = measurement[0]
    of_label = hd.sr.CodeContentItem(
        name=labels.concept,
        value=labels.code(label),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    if "ContentSequence" in item:
        item.ContentSequence.append(of_label)
    else:
        item.ContentSequence = hd.sr.ContentSequence([of_label])
    return measurement


def _gradcam_reference(capture: GradcamCapture, labels: _LabelCodes) -> hd.sr.ImageContentItem:
    """IMAGE 'Visual explanation', derived by Grad-CAM, for the label the heatmap explains."""
    item = hd.sr.ImageContentItem(
        name=_VISUAL_EXPLANATION,
        referenced_sop_class_uid=capture.sop_class_uid,
        referenced_sop_instance_uid=capture.sop_instance_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=_DERIVATION,
                value=_GRADCAM,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            hd.sr.CodeContentItem(
                name=labels.concept,
                value=labels.code(capture.label),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
        ]
    )
    return item


def _assessment_source(report: StudyReport) -> ImageFinding:
    """The analysed image the study assessment came from."""
    for finding in report.findings:
        if (
            str(finding.source.SOPInstanceUID) == report.assessment_source_uid
            and finding.frame_number == report.assessment_frame_number
        ):
            return finding
    frame = "" if report.assessment_frame_number is None else f" frame {report.assessment_frame_number}"
    raise ReportError(f"assessment comes from image {report.assessment_source_uid}{frame}, not analysed")


def _assessment_group(
    report: StudyReport, labels: _LabelCodes, study_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the whole study: its finding, that finding's probability, and its image."""
    source = _assessment_source(report)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("sr-tracking", study_uid, "assessment", report.model.model_id),
            identifier="Study assessment",
        ),
        algorithm_id=_algorithm(report.model),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(labels.concept, labels.code(report.assessment_finding))
        ],
        measurements=[_probability(report.assessment_probability, report.assessment_finding, labels)],
        source_images=[_source_reference(source)],
    )


def _similar_group(
    similar: SimilarStudy,
    rank: int,
    labels: _LabelCodes,
    study_uid: str,
    model: ReportModel,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one similar earlier study: its finding, distance, UID, accession and date."""
    evaluations = (
        []
        if similar.finding is None
        else [hd.sr.QualitativeEvaluation(labels.concept, labels.code(similar.finding))]
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("sr-tracking", study_uid, "similar", similar.study_instance_uid, model.model_id),
            identifier=f"Similar study {rank}",
        ),
        algorithm_id=_algorithm(model),
        qualitative_evaluations=evaluations,
        measurements=[hd.sr.Measurement(name=_EMBEDDING_DISTANCE, value=similar.distance, unit=_NO_UNITS)],
    )
    group[0].ContentSequence.extend(_similar_study_identity(similar))
    return group


def _similar_study_identity(similar: SimilarStudy) -> list[hd.sr.ContentItem]:
    """UIDREF, TEXT and DATE items naming the similar study, so a viewer can retrieve it."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = [
        hd.sr.UIDRefContentItem(
            name=_STUDY_INSTANCE_UID, value=similar.study_instance_uid, relationship_type=contains
        )
    ]
    if similar.accession_number:
        items.append(
            hd.sr.TextContentItem(
                name=_ACCESSION_NUMBER, value=similar.accession_number, relationship_type=contains
            )
        )
    study_date = _parse_da(similar.study_date) if similar.study_date else None
    if study_date is not None:
        items.append(hd.sr.DateContentItem(name=_STUDY_DATE, value=study_date, relationship_type=contains))
    return items


def _add_report_comment(content: hd.sr.MeasurementReport, text: str) -> None:
    """TID 1500 rows 12 and 14: a TEXT evaluation of the whole report, where every SR viewer
    shows it (highdicom builds rows 1-11 only)."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=_COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        ]
    )
    content[0].ContentSequence.append(container)


def _not_clinical_sentence(model: ReportModel) -> str:
    return f"Not for clinical use: {model.not_clinical_reason.strip()}"


def _series_description(model: ReportModel) -> str:
    suffix = "" if model.clinical_use else " - NOT FOR CLINICAL USE"
    return f"{_algorithm_name(model)} findings{suffix}"[:64]


# --- Evidence ------------------------------------------------------------------------------------


_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _unique_sources(findings: Iterable[ImageFinding]) -> list[Dataset]:
    """Each analysed instance once (a multi-frame source may have several findings)."""
    by_uid: dict[str, Dataset] = {}
    for finding in findings:
        by_uid.setdefault(str(finding.source.SOPInstanceUID), finding.source)
    return list(by_uid.values())


def _evidence(findings: Sequence[ImageFinding]) -> list[Dataset]:
    """Every instance the content references: the sources (the first, whose patient and study
    the SR copies, completed with empty type 2 attributes) then the Grad-CAM captures."""
    sources = _unique_sources(findings)
    first = Dataset()  # a new dataset: the caller's header is left untouched
    first.update(sources[0])
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in first:
            setattr(first, keyword, None)
    captures = [_capture_evidence(f.gradcam, f.source) for f in findings if f.gradcam is not None]
    return [first, *sources[1:], *captures]


def _capture_evidence(capture: GradcamCapture, source: Dataset) -> Dataset:
    """The few attributes of a Grad-CAM capture highdicom lists as evidence; the capture is in
    the source's study."""
    evidence = Dataset()
    evidence.StudyInstanceUID = source.StudyInstanceUID
    evidence.SeriesInstanceUID = UID(capture.series_instance_uid)
    evidence.SOPClassUID = UID(capture.sop_class_uid)
    evidence.SOPInstanceUID = UID(capture.sop_instance_uid)
    return evidence
