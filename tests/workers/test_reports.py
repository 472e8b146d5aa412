"""The study's Structured Report: valid for the independent validators, readable by DCMTK, and
saying exactly what the model found, with standard codes, every UID derived and nothing random."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from tests.support.reports import (
    SECONDARY_CAPTURE,
    US_IMAGE,
    US_MULTIFRAME_IMAGE,
    dciodvfy,
    dsrdump,
    fixed_uid,
    source_image,
)
from workers.derived_uids import derived_uid
from workers.reports import (
    CODES_USED,
    PRIVATE_SCHEME,
    GradcamCapture,
    ImageFinding,
    ReportError,
    ReportModel,
    SimilarStudy,
    StudyReport,
    build_report,
)

MODEL_ID = "3f5a9c0e7b21d4c68a90f1e2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6"
THREE_CLASS = ("normal", "benign", "malignant")
REASON = "synthetic phantoms — not for clinical use"
SENTENCE = f"Not for clinical use: {REASON}"
MADE_AT = datetime(2024, 5, 6, 7, 8, 9, 123456)

NORMAL = Code("17621005", "SCT", "Normal")
BENIGN = Code("30807003", "SCT", "Benign")
MALIGNANT = Code("21594007", "SCT", "Malignant")
FINDING = Code("121071", "DCM", "Finding")
ASSESSMENT_CATEGORY = Code("111005", "DCM", "Assessment Category")
PROBABILITY = Code("122157", "DCM", "Probability")
VISUAL_EXPLANATION = Code("130401", "DCM", "Visual explanation")
SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")


# --- Inputs ------------------------------------------------------------------------------------------


def model(labels: Sequence[str] = THREE_CLASS, clinical_use: bool = False) -> ReportModel:
    return ReportModel(
        model_id=MODEL_ID,
        architecture="densenet121",
        labels=tuple(labels),
        clinical_use=clinical_use,
        not_clinical_reason="" if clinical_use else REASON,
    )


def capture(number: int, label: str) -> GradcamCapture:
    return GradcamCapture(SECONDARY_CAPTURE, fixed_uid(1, 9, number), fixed_uid(1, 9), label)


SINGLE = source_image(1, 1)
MULTIFRAME = source_image(1, 2, frames=3)
PLAIN = source_image(1, 3)


def findings() -> list[ImageFinding]:
    """Three analysed images of study 1: a malignant one, frame 2 of a multi-frame benign one,
    and a normal one without a Grad-CAM capture."""
    return [
        ImageFinding(
            SINGLE,
            None,
            "malignant",
            {"normal": 0.05, "benign": 0.15, "malignant": 0.8},
            capture(1, "malignant"),
        ),
        ImageFinding(
            MULTIFRAME, 2, "benign", {"normal": 0.2, "benign": 0.7, "malignant": 0.1}, capture(2, "benign")
        ),
        ImageFinding(PLAIN, None, "normal", {"normal": 0.9, "benign": 0.06, "malignant": 0.04}, None),
    ]


SIMILAR = (
    SimilarStudy(fixed_uid(40), "ACC40", "20230115", "malignant", 0.125),
    SimilarStudy(fixed_uid(41), "", "", None, 0.5),
)


def study_report(**changes: Any) -> StudyReport:
    report = StudyReport(
        model=model(),
        findings=findings(),
        assessment_finding="malignant",
        assessment_probability=0.8,
        assessment_source_uid=str(SINGLE.SOPInstanceUID),
        made_at=MADE_AT,
        revision=1,
        similar=SIMILAR,
    )
    return dataclasses.replace(report, **changes)


def written(sr: Dataset, directory: Path, name: str = "sr.dcm") -> Path:
    path = directory / name
    sr.save_as(path, enforce_file_format=True)
    return path


def read_back(path: Path) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(dcmread(path))


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default report (three images, two similar studies, a research model), written once
    for the tests that only read it."""
    return written(build_report(study_report()), tmp_path_factory.mktemp("report"))


# --- Reading the content back --------------------------------------------------------------------


def measurement_report(sr: Dataset) -> hd.sr.MeasurementReport:
    """The content as highdicom reads it back: a TID 1500 Measurement Report, or the test fails."""
    content = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=False).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def groups(sr: Dataset) -> dict[str, Dataset]:
    """Measurement groups (their CONTAINER items) by tracking identifier."""
    return {str(g.tracking_identifier): g[0] for g in measurement_report(sr).get_image_measurement_groups()}


def children(item: Dataset, name: Code, value_type: hd.sr.ValueTypeValues) -> list[Any]:
    return list(hd.sr.utils.find_content_items(item, name=name, value_type=value_type))


def coded(item: Dataset) -> Code:
    concept = item.ConceptCodeSequence[0]
    return Code(
        concept.CodeValue,
        concept.CodingSchemeDesignator,
        concept.CodeMeaning,
        scheme_version=concept.get("CodingSchemeVersion"),
    )


def evaluation(group: Dataset, concept: Code = FINDING) -> list[Code]:
    return [coded(item) for item in children(group, concept, hd.sr.ValueTypeValues.CODE)]


def probabilities(group: Dataset, concept: Code = FINDING) -> dict[Code, float]:
    """Each 'Probability' NUM of the group, keyed by the label its concept modifier names."""
    result: dict[Code, float] = {}
    for num in children(group, PROBABILITY, hd.sr.ValueTypeValues.NUM):
        (modifier,) = children(num, concept, hd.sr.ValueTypeValues.CODE)
        assert modifier.RelationshipType == "HAS CONCEPT MOD"
        unit = num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
        result[coded(modifier)] = float(num.MeasuredValueSequence[0].NumericValue)
    return result


def images(group: Dataset, name: Code) -> list[tuple[str, str, list[int]]]:
    """(SOP class, SOP instance, frames) of the group's IMAGE items called ``name``."""
    found = []
    for item in children(group, name, hd.sr.ValueTypeValues.IMAGE):
        reference = item.ReferencedSOPSequence[0]
        frames = reference.get("ReferencedFrameNumber")
        frame_list = (
            [] if frames is None else [int(f) for f in (frames if isinstance(frames, list) else [frames])]
        )
        found.append((reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID, frame_list))
    return found


def text(group: Dataset, name: Code) -> list[str]:
    return [item.TextValue for item in children(group, name, hd.sr.ValueTypeValues.TEXT)]


# --- Validity --------------------------------------------------------------------------------------


def test_the_report_passes_dciodvfy_with_only_the_private_scheme_warning(tmp_path: Path) -> None:
    first = build_report(study_report())
    second = build_report(study_report(revision=2, predecessors=[first]))

    for path in (written(first, tmp_path, "1.dcm"), written(second, tmp_path, "2.dcm")):
        validation = dciodvfy(path)
        assert "Comprehensive3DSR" in validation.output
        assert validation.errors == [], validation.output
        # dicom3tools knows the standard's coding schemes only; the private one (declared in
        # the Coding Scheme Identification Sequence) is the one warning left.
        assert validation.warnings, "expected dciodvfy to note the private coding scheme"
        assert all(PRIVATE_SCHEME in warning for warning in validation.warnings), validation.output


def test_dcmtk_accepts_the_content_tree_and_shows_findings_probabilities_and_the_warning(
    report_file: Path,
) -> None:
    path = report_file

    full = dsrdump(path, "+Pl")
    assert full.returncode == 0, full.stderr
    assert not [line for line in full.stderr.splitlines() if line.startswith(("E:", "F:"))], full.stderr
    for shown in (
        '(21594007,SCT,"Malignant")',
        '(30807003,SCT,"Benign")',
        '(17621005,SCT,"Normal")',
        'NUM:(,,"Probability")="0.8"',
        'NUM:(,,"Probability")="0.06"',
        'IMAGE:(,,"Visual explanation")=(SC image,)',
        'IMAGE:(,,"Source of Measurement")=(USm image,,2)',
        '"Tracking Identifier")="Study assessment"',
        '"Embedding distance")="0.125"',
        f'TEXT:(,,"Comment")="{SENTENCE}"',
    ):
        assert shown in full.stdout, shown
    # dsrdump shortens long TEXT values by default; the series line says it there too.
    default = dsrdump(path)
    assert default.returncode == 0
    assert "NOT FOR CLINICAL USE" in default.stdout


# --- Content ---------------------------------------------------------------------------------------


def test_each_image_has_its_finding_every_probability_its_source_and_its_gradcam(report_file: Path) -> None:
    sr = read_back(report_file)
    by_id = groups(sr)

    first = by_id["Image 1 of 3"]
    assert evaluation(first) == [MALIGNANT]
    assert probabilities(first) == {NORMAL: 0.05, BENIGN: 0.15, MALIGNANT: 0.8}
    assert images(first, SOURCE_OF_MEASUREMENT) == [(US_IMAGE, SINGLE.SOPInstanceUID, [])]
    assert images(first, VISUAL_EXPLANATION) == [(SECONDARY_CAPTURE, fixed_uid(1, 9, 1), [])]
    (explanation,) = children(first, VISUAL_EXPLANATION, hd.sr.ValueTypeValues.IMAGE)
    assert evaluation(explanation) == [MALIGNANT]  # the class the heatmap explains

    second = by_id["Image 2 of 3, frame 2"]
    assert evaluation(second) == [BENIGN]
    assert probabilities(second) == {NORMAL: 0.2, BENIGN: 0.7, MALIGNANT: 0.1}
    assert images(second, SOURCE_OF_MEASUREMENT) == [(US_MULTIFRAME_IMAGE, MULTIFRAME.SOPInstanceUID, [2])]
    assert images(second, VISUAL_EXPLANATION) == [(SECONDARY_CAPTURE, fixed_uid(1, 9, 2), [])]

    third = by_id["Image 3 of 3"]
    assert evaluation(third) == [NORMAL]
    assert images(third, VISUAL_EXPLANATION) == []


def test_every_referenced_instance_is_listed_as_evidence_and_the_library_holds_each_image(
    report_file: Path,
) -> None:
    sr = read_back(report_file)

    evidence = {(uid.__str__(), cls.__str__()) for _, _, uid, cls in sr.get_evidence()}
    assert evidence == {
        (str(SINGLE.SOPInstanceUID), US_IMAGE),
        (str(MULTIFRAME.SOPInstanceUID), US_MULTIFRAME_IMAGE),
        (str(PLAIN.SOPInstanceUID), US_IMAGE),
        (fixed_uid(1, 9, 1), SECONDARY_CAPTURE),
        (fixed_uid(1, 9, 2), SECONDARY_CAPTURE),
    }
    library = children(sr.content[0], Code("111028", "DCM", "Image Library"), hd.sr.ValueTypeValues.CONTAINER)
    entries = hd.sr.utils.find_content_items(
        library[0], value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True
    )
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [
        SINGLE.SOPInstanceUID,
        MULTIFRAME.SOPInstanceUID,
        PLAIN.SOPInstanceUID,
    ]
    assert sr.PatientID == "PHANTOM-1"
    assert sr.StudyInstanceUID == SINGLE.StudyInstanceUID


def test_the_model_is_the_observer_and_identifies_its_algorithm_in_every_group(report_file: Path) -> None:
    sr = read_back(report_file)

    (observer,) = measurement_report(sr).get_observer_contexts(observer_type=Code("121007", "DCM", "Device"))
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == derived_uid("device", MODEL_ID)
    assert device.name == "Precedent densenet121"
    assert device.manufacturer_name == "Precedent"
    assert device.model_name == "densenet121"
    for group in groups(sr).values():
        assert text(group, Code("111001", "DCM", "Algorithm Name")) == ["Precedent densenet121"]
        assert text(group, Code("111003", "DCM", "Algorithm Version")) == [MODEL_ID[:12]]
        assert f"model id {MODEL_ID}" in text(group, Code("111002", "DCM", "Algorithm Parameters"))
    assert sr.Manufacturer == "Precedent"
    assert sr.ManufacturerModelName == "densenet121"


def test_the_study_assessment_names_its_finding_probability_and_image(tmp_path: Path) -> None:
    report = study_report(
        assessment_finding="benign",
        assessment_probability=0.7,
        assessment_source_uid=str(MULTIFRAME.SOPInstanceUID),
        assessment_frame_number=2,
    )
    assessment = groups(read_back(written(build_report(report), tmp_path)))["Study assessment"]

    assert evaluation(assessment) == [BENIGN]
    assert probabilities(assessment) == {BENIGN: 0.7}
    assert images(assessment, SOURCE_OF_MEASUREMENT) == [
        (US_MULTIFRAME_IMAGE, MULTIFRAME.SOPInstanceUID, [2])
    ]


def test_similar_studies_carry_their_uid_accession_date_finding_and_distance(report_file: Path) -> None:
    by_id = groups(read_back(report_file))

    nearest, other = by_id["Similar study 1"], by_id["Similar study 2"]
    uid_name = Code("110180", "DCM", "Study Instance UID")
    assert [i.UID for i in children(nearest, uid_name, hd.sr.ValueTypeValues.UIDREF)] == [fixed_uid(40)]
    assert text(nearest, Code("121022", "DCM", "Accession Number")) == ["ACC40"]
    (study_date,) = children(nearest, Code("111060", "DCM", "Study Date"), hd.sr.ValueTypeValues.DATE)
    assert study_date.Date == "20230115"
    assert evaluation(nearest) == [MALIGNANT]
    (distance,) = children(
        nearest, Code("EMBED-DISTANCE", PRIVATE_SCHEME, "Embedding distance"), hd.sr.ValueTypeValues.NUM
    )
    assert float(distance.MeasuredValueSequence[0].NumericValue) == 0.125

    # What is not known is left out, not written empty.
    assert [i.UID for i in children(other, uid_name, hd.sr.ValueTypeValues.UIDREF)] == [fixed_uid(41)]
    assert text(other, Code("121022", "DCM", "Accession Number")) == []
    assert evaluation(other) == []


def test_bi_rads_labels_are_reported_with_cid_6027_codes(tmp_path: Path) -> None:
    labels = ("BI-RADS 1", "BI-RADS 2", "BI-RADS 3", "BI-RADS 4A", "BI-RADS 5", "BI-RADS 6")
    probabilities_in = dict(zip(labels, (0.05, 0.1, 0.1, 0.55, 0.15, 0.05), strict=True))
    report = study_report(
        model=model(labels),
        findings=[ImageFinding(SINGLE, None, "BI-RADS 4A", probabilities_in, capture(1, "BI-RADS 4A"))],
        assessment_finding="BI-RADS 4A",
        assessment_probability=0.55,
        similar=[SimilarStudy(fixed_uid(40), "ACC40", "20230115", "BI-RADS 6", 0.2)],
    )
    path = written(build_report(report), tmp_path)
    by_id = groups(read_back(path))

    low_suspicion = Code("MA.II.A.5.4A", "BI", "4A - Low suspicion", scheme_version="4.0")
    image = by_id["Image 1 of 1"]
    assert evaluation(image, ASSESSMENT_CATEGORY) == [low_suspicion]
    assert probabilities(image, ASSESSMENT_CATEGORY) == {
        Code("397140005", "SCT", "1 - Negative"): 0.05,
        Code("397141009", "SCT", "2 - Benign"): 0.1,
        Code("397143007", "SCT", "3 - Probably Benign"): 0.1,
        low_suspicion: 0.55,
        Code("397145000", "SCT", "5 - Highly suggestive of malignancy"): 0.15,
        Code("MA.II.A.5.6", "BI", "6 - Known biopsy proven malignancy", scheme_version="4.0"): 0.05,
    }
    assert evaluation(by_id["Study assessment"], ASSESSMENT_CATEGORY) == [low_suspicion]
    assert evaluation(by_id["Similar study 1"], ASSESSMENT_CATEGORY) == [
        Code("MA.II.A.5.6", "BI", "6 - Known biopsy proven malignancy", scheme_version="4.0")
    ]
    assert dciodvfy(path).errors == []


@pytest.mark.parametrize(
    ("labels", "categories"),
    [
        (("1", "2", "3", "4", "5", "6"), ["1", "2", "3", "4", "5", "6"]),
        (("birads_0", "BIRADS-2", "bi-rads 4c"), ["0", "2", "4C"]),
        (("BI-RADS 4", "BI-RADS 4B"), ["4", "4B"]),
    ],
)
def test_bi_rads_label_spellings_are_recognised(labels: tuple[str, ...], categories: list[str]) -> None:
    probabilities_in = {label: 1 / len(labels) for label in labels}
    report = study_report(
        model=model(labels),
        findings=[ImageFinding(SINGLE, None, labels[-1], probabilities_in, None)],
        assessment_finding=labels[-1],
        similar=(),
    )
    group = groups(build_report(report))["Image 1 of 1"]

    # CID 6027 meanings start with the category: '4C - Moderate suspicion'
    assert [code.meaning.split(" - ")[0] for code in probabilities(group, ASSESSMENT_CATEGORY)] == categories
    (code,) = evaluation(group, ASSESSMENT_CATEGORY)
    assert code.meaning.split(" - ")[0] == categories[-1]


@pytest.mark.parametrize(
    ("modalities", "procedures"),
    [
        (("US",), [Code("47079000", "SCT", "Ultrasonography of breast")]),
        (("MG",), [Code("71651007", "SCT", "Mammography")]),
        (
            ("US", "MG", "US"),
            [Code("47079000", "SCT", "Ultrasonography of breast"), Code("71651007", "SCT", "Mammography")],
        ),
    ],
)
def test_the_procedure_reported_follows_the_modalities_analysed(
    modalities: tuple[str, ...], procedures: list[Code], tmp_path: Path
) -> None:
    sources = [source_image(1, n, modality=m) for n, m in enumerate(modalities, start=1)]
    report = study_report(
        findings=[
            ImageFinding(s, None, "normal", {"normal": 1.0, "benign": 0.0, "malignant": 0.0}, None)
            for s in sources
        ],
        assessment_finding="normal",
        assessment_probability=1.0,
        assessment_source_uid=str(sources[0].SOPInstanceUID),
    )
    path = written(build_report(report), tmp_path)

    reported = children(
        read_back(path).content[0], Code("121058", "DCM", "Procedure reported"), hd.sr.ValueTypeValues.CODE
    )
    assert [coded(item) for item in reported] == procedures
    assert dciodvfy(path).errors == []


def test_a_clinical_model_gets_no_warning_and_product_qualification(tmp_path: Path) -> None:
    path = written(build_report(study_report(model=model(clinical_use=True))), tmp_path)

    rendering = dsrdump(path, "+Pl").stdout
    assert "clinical use" not in rendering.lower()
    sr = read_back(path)
    assert sr.ContentQualification == "PRODUCT"
    assert sr.SeriesDescription == "Precedent densenet121 findings"


def test_a_research_model_is_marked_in_the_content_and_the_header(report_file: Path) -> None:
    sr = read_back(report_file)

    evaluations = children(
        sr.content[0], Code("C0034375", "UMLS", "Qualitative Evaluations"), hd.sr.ValueTypeValues.CONTAINER
    )
    assert text(evaluations[0], Code("121106", "DCM", "Comment")) == [SENTENCE]
    assert sr.ContentQualification == "RESEARCH"
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    assert sr.SpecificCharacterSet == "ISO_IR 192"  # the em dash in the reason survives


# --- Identity and revisions ------------------------------------------------------------------------


def test_the_same_inputs_make_the_same_bytes(tmp_path: Path) -> None:
    first = written(build_report(study_report()), tmp_path, "first.dcm")
    second = written(build_report(study_report()), tmp_path, "second.dcm")

    assert first.read_bytes() == second.read_bytes()
    sr = read_back(first)
    study = str(SINGLE.StudyInstanceUID)
    assert sr.SOPInstanceUID == derived_uid("sr", study, MODEL_ID, "1")
    assert sr.SeriesInstanceUID == derived_uid("sr-series", study, MODEL_ID)
    assert (str(sr.ContentDate), str(sr.ContentTime), str(sr.InstanceCreationDate)) == (
        "20240506",
        "070809.123456",
        "20240506",
    )


def test_a_new_revision_is_a_new_instance_in_the_same_series_naming_its_predecessor() -> None:
    first = build_report(study_report())
    second = build_report(study_report(revision=2, predecessors=[first], made_at=datetime(2024, 5, 7)))

    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.InstanceNumber == 2
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == SINGLE.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == [first.SOPInstanceUID]
    assert "PredecessorDocumentsSequence" not in first


def test_building_leaves_the_source_headers_untouched() -> None:
    header = source_image(1, 1)
    del header.PatientBirthDate, header.ReferringPhysicianName  # type 2, often missing
    before = copy.deepcopy(header)
    report = study_report(
        findings=[
            ImageFinding(header, None, "benign", {"normal": 0.1, "benign": 0.8, "malignant": 0.1}, None)
        ],
        assessment_finding="benign",
        assessment_source_uid=str(header.SOPInstanceUID),
    )

    sr = build_report(report)

    assert header == before
    assert "PatientBirthDate" not in header
    assert sr.PatientBirthDate in (None, "")


# --- Refusals ----------------------------------------------------------------------------------------


def _with_probabilities(probabilities_in: dict[str, float]) -> list[ImageFinding]:
    return [ImageFinding(SINGLE, None, "malignant", probabilities_in, None)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"findings": []}, "at least one analysed image"),
        ({"revision": 0}, "revision counts from 1"),
        ({"assessment_finding": "cyst"}, "'cyst' is not a label"),
        ({"assessment_probability": 1.5}, "not in [0, 1]"),
        ({"assessment_source_uid": fixed_uid(1, 1, 99)}, "not analysed"),
        ({"findings": _with_probabilities({"normal": 0.5, "malignant": 0.5})}, "has probabilities for"),
        (
            {"findings": _with_probabilities({"normal": 0.1, "benign": 0.1, "malignant": float("nan")})},
            "not in [0, 1]",
        ),
        (
            {
                "findings": [ImageFinding(SINGLE, 1, "normal", dict.fromkeys(THREE_CLASS, 0.3), None)],
                "assessment_frame_number": 1,
            },
            "cannot be referenced",
        ),
        (
            {"findings": [ImageFinding(MULTIFRAME, 4, "normal", dict.fromkeys(THREE_CLASS, 0.3), None)]},
            "frame 4",
        ),
        (
            {
                "findings": [
                    *findings(),
                    ImageFinding(source_image(2, 1), None, "normal", dict.fromkeys(THREE_CLASS, 0.3), None),
                ]
            },
            "from 2 studies",
        ),
        ({"model": model(("normal", "cyst"))}, "no standard code"),
        ({"model": dataclasses.replace(model(), not_clinical_reason=" ")}, "gives no reason"),
        ({"similar": [SimilarStudy(fixed_uid(40), "", "2023-01-15", None, 0.1)]}, "not YYYYMMDD"),
        ({"similar": [SimilarStudy(fixed_uid(40), "", "", None, -1.0)]}, "distance -1.0"),
        ({"similar": [SIMILAR[0], SIMILAR[0]]}, "similar study listed more than once"),
        ({"findings": [*findings(), findings()[1]]}, "analysed image listed more than once"),
        ({"model": model(("BI-RADS 4", "4"))}, "the same category more than once"),
        ({"model": model(())}, "has no labels"),
    ],
)
def test_inconsistent_inputs_are_refused_with_a_reason(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ReportError, match=re.escape(message)):
        build_report(study_report(**changes))


def test_a_report_cannot_be_its_own_predecessor() -> None:
    first = build_report(study_report())
    with pytest.raises(ReportError, match="its own predecessor"):
        build_report(study_report(predecessors=[first]))


def test_the_codes_table_lists_every_code_the_report_uses(report_file: Path) -> None:
    """The conformance statement prints CODES_USED; a code written but not listed would make it lie."""
    sr = dcmread(report_file)
    listed = {(use.code.value, use.code.scheme_designator) for use in CODES_USED}
    written_codes = set(_codes_in(sr.ContentSequence))
    # highdicom's own: observer type, language, the library's modality and pixel units
    highdicom_own = {("121007", "DCM"), ("en-US", "RFC5646"), ("US", "DCM"), ("{pixels}", "UCUM")}
    assert written_codes - highdicom_own <= listed, written_codes - highdicom_own - listed


def _codes_in(items: Sequence[Dataset]) -> list[tuple[str, str]]:
    found = []
    for item in items:
        for concept in item.get("ConceptCodeSequence", []):
            found.append((concept.CodeValue, concept.CodingSchemeDesignator))
        for unit in (m.MeasurementUnitsCodeSequence[0] for m in item.get("MeasuredValueSequence", [])):
            found.append((unit.CodeValue, unit.CodingSchemeDesignator))
        found.extend(_codes_in(item.get("ContentSequence", [])))
    return found
