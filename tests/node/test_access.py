"""Who may associate with the node, how many at once, and how large an instance may be.

Peers are DCMTK's own tools wherever the wording a modality operator would see matters
(the A-ASSOCIATE-RJ reason, the C-STORE status), and pynetdicom SCUs where the test must
hold an association open while it checks something else.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select

from node.catalog.models import Instance
from tests.support.data import PYDICOM_TEST_DIR, ultrasound_file
from tests.support.dcmtk import echoscu, storescu
from tests.support.nodes import RunningNode
from tests.support.waiting import wait_until
from tests.support.wire import idle_association

CALLING_AE_REJECTION = (
    "Result: Rejected Permanent, Source: Service User",
    "Reason: Calling AE Title Not Recognized",
)
CALLED_AE_REJECTION = (
    "Result: Rejected Permanent, Source: Service User",
    "Reason: Called AE Title Not Recognized",
)
LIMIT_REJECTION = ("Result: Rejected Transient", "Reason: Local Limit Exceeded")

# A sound instance far below any size limit the tests set (about 39 KB).
SMALL_FILE = PYDICOM_TEST_DIR / "CT_small.dcm"


def output_of(done: subprocess.CompletedProcess[str]) -> str:
    """DCMTK logs to stderr; keep both streams so no message is missed."""
    return done.stdout + done.stderr


def assert_accepted(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, output_of(done)
    assert "Association Accepted" in output_of(done)


def assert_rejected(done: subprocess.CompletedProcess[str], wording: tuple[str, ...]) -> None:
    """Rejected at association time, with exactly the reason DCMTK shows the operator."""
    text = output_of(done)
    assert done.returncode != 0, text
    assert "Association Rejected" in text, text
    for line in wording:
        assert line in text, text


# --- calling-AE allowlist ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "calling"),
    [
        pytest.param([], "ANYONE", id="empty-list-admits-anyone"),
        pytest.param(["MODALITY"], "MODALITY", id="listed-title"),
        pytest.param(["OTHER", "MODALITY"], "MODALITY", id="any-entry-of-several"),
        pytest.param(["MODALITY@127.0.0.1"], "MODALITY", id="title-at-its-address"),
        pytest.param(["MODALITY@127.0.0.0/8"], "MODALITY", id="title-in-its-network"),
        pytest.param(["MODALITY@10.9.9.9", "MODALITY@127.0.0.1"], "MODALITY", id="one-of-its-hosts"),
    ],
)
def test_an_allowed_calling_ae_is_accepted(
    start_node: Callable[..., RunningNode], allowed: list[str], calling: str
) -> None:
    running = start_node(dicom={"allowed_calling_aets": allowed})
    assert_accepted(echoscu(running.port, calling=calling))


@pytest.mark.parametrize(
    ("allowed", "calling"),
    [
        pytest.param(["MODALITY"], "OTHER", id="unlisted-title"),
        pytest.param(["MODALITY"], "MODALITYX", id="no-prefix-match"),
        pytest.param(["MODALITY@10.9.9.9"], "MODALITY", id="listed-title-from-another-host"),
        pytest.param(["MODALITY@10.0.0.0/8"], "MODALITY", id="listed-title-outside-its-network"),
        pytest.param(["OTHER@127.0.0.1"], "MODALITY", id="host-listed-for-another-title"),
    ],
)
def test_a_calling_ae_not_allowed_is_rejected_permanently_as_not_recognized(
    start_node: Callable[..., RunningNode], allowed: list[str], calling: str
) -> None:
    running = start_node(dicom={"allowed_calling_aets": allowed})
    assert_rejected(echoscu(running.port, calling=calling), CALLING_AE_REJECTION)


def test_the_allowlist_guards_the_similarity_ae_title_too(start_node: Callable[..., RunningNode]) -> None:
    """Both AE titles share one port and one policy: the second title is no side door."""
    running = start_node(dicom={"allowed_calling_aets": ["MODALITY"]})
    assert_rejected(echoscu(running.port, calling="OTHER", called="PRECEDENT_SIM"), CALLING_AE_REJECTION)
    assert_accepted(echoscu(running.port, calling="MODALITY", called="PRECEDENT_SIM"))


def test_a_rejected_peer_is_logged_as_a_warning_naming_its_calling_ae(
    start_node: Callable[..., RunningNode], caplog: pytest.LogCaptureFixture
) -> None:
    """The operator must be able to find out which modality is knocking and being turned away."""
    caplog.set_level(logging.INFO, logger="node.handlers")
    running = start_node(dicom={"allowed_calling_aets": ["MODALITY"]})
    assert_rejected(echoscu(running.port, calling="INTRUDER"), CALLING_AE_REJECTION)
    warnings = [r for r in caplog.records if r.name == "node.handlers" and r.levelno == logging.WARNING]
    assert any("INTRUDER" in r.getMessage() for r in warnings), [r.getMessage() for r in caplog.records]


# --- called AE title -----------------------------------------------------------------------


@pytest.mark.parametrize("called", ["PRECEDENT", "PRECEDENT_SIM"])
def test_both_of_the_node_s_ae_titles_answer_c_echo(
    start_node: Callable[..., RunningNode], called: str
) -> None:
    running = start_node()
    assert_accepted(echoscu(running.port, called=called))


@pytest.mark.parametrize("called", ["PACS", "PRECEDENT_X", "ANY-SCP"])
def test_a_called_ae_title_that_is_not_the_node_s_is_rejected_as_not_recognized(
    start_node: Callable[..., RunningNode], called: str
) -> None:
    running = start_node(dicom={"allowed_calling_aets": ["MODALITY"]})
    assert_rejected(echoscu(running.port, calling="MODALITY", called=called), CALLED_AE_REJECTION)


def test_configured_ae_titles_replace_the_defaults(start_node: Callable[..., RunningNode]) -> None:
    running = start_node(dicom={"ae_title": "BREAST_AI", "similar_ae_title": "BREAST_SIM"})
    assert_accepted(echoscu(running.port, called="BREAST_AI"))
    assert_accepted(echoscu(running.port, called="BREAST_SIM"))
    assert_rejected(echoscu(running.port, called="PRECEDENT"), CALLED_AE_REJECTION)


# --- simultaneous associations -------------------------------------------------------------


def test_an_association_beyond_the_maximum_is_rejected_transiently_until_one_ends(
    start_node: Callable[..., RunningNode],
) -> None:
    running = start_node(dicom={"max_associations": 2})
    with idle_association(running.port, "HOLDER1"), idle_association(running.port, "HOLDER2") as second:
        assert_rejected(echoscu(running.port), LIMIT_REJECTION)
        second.release()
        # The released association's thread, and the rejected one's, end shortly after.
        wait_until(lambda: running.node.acceptor.active_associations() < 2, 10, "an association slot is free")
        assert_accepted(echoscu(running.port))


# --- instance size -------------------------------------------------------------------------


def stored_uids(running: RunningNode) -> set[str]:
    with running.node.catalog.engine.connect() as connection:
        return set(connection.execute(select(Instance.sop_instance_uid)).scalars())


def test_an_instance_over_the_size_limit_is_refused_out_of_resources_and_the_association_goes_on(
    start_node: Callable[..., RunningNode],
) -> None:
    large, small = ultrasound_file(), SMALL_FILE
    limit = 100_000
    assert large.stat().st_size > limit > small.stat().st_size
    running = start_node(dicom={"max_instance_bytes": limit})

    run = storescu(running.port, [large, small])

    assert "Received Store Response (Refused: OutOfResources)" in run.output, run.output
    assert run.refused == [large], run.output
    assert run.acknowledged == [small], run.output
    assert stored_uids(running) == {str(dcmread(small, stop_before_pixels=True).SOPInstanceUID)}
    assert not any(running.node.store.incoming_dir.iterdir()), "the refused file was left behind"


def test_the_size_refusal_is_status_a700_with_a_comment_naming_the_setting(
    start_node: Callable[..., RunningNode],
) -> None:
    """A700 (out of resources) tells the modality not to retry blindly; the comment says why."""
    running = start_node(dicom={"max_instance_bytes": 100_000})
    dataset = dcmread(ultrasound_file())
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="PRECEDENT")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
        ae.shutdown()
    assert status.Status == 0xA700
    assert "max_instance_bytes" in status.ErrorComment
