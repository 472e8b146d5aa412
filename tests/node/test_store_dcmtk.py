"""DCMTK's storescu pushes every real file we have; what the node says matches what it keeps."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from node.catalog.models import Instance
from node.errors import IngestError
from node.header import read_instance_header
from tests.support.data import content, pydicom_data_files, pydicom_test_files, transfer_syntax_of
from tests.support.dcmtk import PROPOSE_FLAG, StoreRun, dcmtk, echoscu, group_by_transfer_syntax, storescu
from tests.support.nodes import RunningNode


def sendable(files: list[Path]) -> list[Path]:
    """Files storescu can send as stored: file meta with a transfer syntax it can propose."""
    return [f for f in files if transfer_syntax_of(f) in PROPOSE_FLAG]


def push_concurrently(port: int, files: list[Path]) -> StoreRun:
    """One association per transfer syntax, all at once."""
    syntaxes = {f: str(transfer_syntax_of(f)) for f in files}
    groups = group_by_transfer_syntax(files, syntaxes)
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        runs = list(pool.map(lambda item: storescu(port, item[1], propose=item[0]), groups.items()))
    merged = StoreRun(0, "\n".join(r.output for r in runs))
    for run in runs:
        merged.sent += run.sent
        merged.acknowledged += run.acknowledged
        merged.refused += run.refused
    return merged


def node_would_accept(path: Path) -> bool:
    try:
        read_instance_header(path)
    except IngestError:
        return False
    return True


def stored_instances(running: RunningNode) -> dict[str, Path]:
    with running.node.catalog.engine.connect() as connection:
        rows = connection.execute(select(Instance.sop_instance_uid, Instance.file_path)).all()
    return {uid: running.data_dir / path for uid, path in rows}


def check_push(running: RunningNode, files: list[Path]) -> StoreRun:
    run = push_concurrently(running.port, files)
    # storescu itself skips files where it finds no SOP Class / Instance UID; all others reach us.
    for skipped in set(files) - set(run.sent):
        assert f"{skipped}, ignoring file" in run.output
    assert sorted(run.acknowledged + run.refused) == sorted(run.sent), run.output[-3000:]
    # Every refusal is one the node's own reading justifies, and nothing sound is refused.
    assert sorted(run.refused) == sorted(f for f in run.sent if not node_would_accept(f))
    stored = stored_instances(running)
    sent_by_uid: dict[str, list[Path]] = {}
    for path in run.acknowledged:
        sent_by_uid.setdefault(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), []).append(path)
    assert set(stored) == set(sent_by_uid)
    for uid, stored_path in stored.items():
        kept = content(dcmread(stored_path))
        assert any(kept == content(dcmread(sent)) for sent in sent_by_uid[uid]), uid
    assert not any(running.node.store.incoming_dir.iterdir()), "received files left behind"
    assert echoscu(running.port).returncode == 0
    return run


def test_every_pydicom_data_file_is_stored_as_sent(
    start_node: Callable[..., RunningNode], catalog_url: str
) -> None:
    files = sendable(pydicom_data_files())
    assert len(files) >= 60
    running = start_node(catalog_url)
    run = check_push(running, files)
    # Real files of every modality and transfer syntax, not a lucky few.
    assert len(run.acknowledged) >= 60
    syntaxes = {transfer_syntax_of(f) for f in run.acknowledged}
    assert len(syntaxes) >= 9


def test_every_pydicom_test_file_is_answered_and_kept_when_sound(
    start_node: Callable[..., RunningNode], catalog_url: str
) -> None:
    files = sendable(pydicom_test_files())
    assert len(files) >= 100
    running = start_node(catalog_url)
    run = check_push(running, files)
    assert run.refused, "pydicom's test set holds broken files; some must be refused"


def test_the_peers_are_dcmtk_not_pynetdicom_namesakes() -> None:
    """pynetdicom installs echoscu, storescu, storescp … into the venv; tests must not use them."""
    venv = Path(sys.prefix).resolve()
    for tool in ("echoscu", "storescu", "storescp"):
        path = Path(dcmtk(tool)).resolve()
        assert not path.is_relative_to(venv), path
        banner = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True)
        assert "dcmtk" in banner.stdout.lower()
