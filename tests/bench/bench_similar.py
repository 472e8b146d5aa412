"""Similarity C-FIND benchmark: end-to-end latency of a similar-studies query over DICOM with
N analysed studies, next to what the FAISS index alone takes for the same query.

Run on demand (CI runs it only at a tiny size, see ``test_bench_similar_smoke.py``)::

    python -m tests.bench.bench_similar --studies 100000 [--dim 1024] [--queries 100]

The catalog is filled as ``bench_find`` fills it (one image per study), plus, for every image,
an embedding of a model (a tiny bundle's id; clustered random vectors, a finding per
cluster) and a done analysis and study assessment, as the workers would have written them.
``precedent serve`` runs on it with that bundle and no local worker; its index is opened
(or built, and snapshotted) at start-up, before timing. The client holds one association to
``PRECEDENT_SIM`` and sends STUDY-level requests for random stored studies (k = 10,
asking the keys a viewer's study list asks for). Baseline, same run and same query
studies: the same model index, opened from the node's snapshot in this process, searched
for the query study's vector (what FAISS alone costs).
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import insert

from node.catalog.analyses import AnalysisRecords, ModelRecord
from node.catalog.models import ANALYSES, EMBEDDINGS, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.settings import load_settings
from tests.bench.bench_find import association, fill_catalog, node_find, study_row
from tests.support.models import LABELS, tiny_bundle
from tests.support.nodes import NodeProcess, free_port, write_config
from workers.bundles import load_bundle
from workers.index import SimilarityIndex
from workers.index_keeper import index_options, index_snapshot

_BATCH = 5000
K = 10


def fill_embeddings(url: str, studies: int, dim: int, model_id: str, seed: int = 0) -> np.ndarray:
    """One embedding per study's image (instance pk = study index + 1), clustered; returns them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(LABELS) * 4, dim)).astype(np.float32) * 2
    cluster = rng.integers(0, len(centres), size=studies)
    vectors = (centres[cluster] + rng.normal(size=(studies, dim)).astype(np.float32)).astype("<f4")
    now = datetime.now(UTC)
    catalog = Catalog.open(url)
    try:
        AnalysisRecords(catalog).register_model(ModelRecord(model_id, "cnn4", LABELS, False, {}))
        with catalog.engine.begin() as connection:
            for start in range(0, studies, _BATCH):
                ids = range(start, min(start + _BATCH, studies))
                connection.execute(
                    insert(EMBEDDINGS),
                    [
                        {
                            "instance_pk": s + 1,
                            "model_id": model_id,
                            "dimension": dim,
                            "vector": vectors[s].tobytes(),
                            "created_at": now,
                        }
                        for s in ids
                    ],
                )
                connection.execute(
                    insert(ANALYSES),
                    [
                        {
                            "instance_pk": s + 1,
                            "model_id": model_id,
                            "state": "done",
                            "reason": "",
                            "attempts": 1,
                            "requested_at": now,
                            "predicted_label": LABELS[cluster[s] % len(LABELS)],
                            "probabilities": dict.fromkeys(LABELS, 1 / len(LABELS)),
                        }
                        for s in ids
                    ],
                )
                connection.execute(
                    insert(STUDY_ASSESSMENTS),
                    [
                        {
                            "study_pk": s + 1,
                            "model_id": model_id,
                            "revision": 1,
                            "state": "done",
                            "reason": "",
                            "attempts": 1,
                            "requested_at": now,
                            "finding": LABELS[cluster[s] % len(LABELS)],
                            "probability": 0.5,
                            "analysed_instances": 1,
                        }
                        for s in ids
                    ],
                )
    finally:
        catalog.close()
    return vectors


def request(study: int) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_row(study)["study_uid"]
    for keyword in ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyDescription"):
        setattr(identifier, keyword, "")
    identifier.ModalitiesInStudy = ""
    return identifier


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(studies: int, dim: int, queries: int) -> tuple[dict[str, list[float]], str]:
    with tempfile.TemporaryDirectory(prefix="bench-similar-") as scratch:
        root = Path(scratch)
        url = f"sqlite:///{root / 'catalog.sqlite3'}"
        bundle = tiny_bundle(root / "model.bundle")
        model_id = load_bundle(bundle).id
        fill_catalog(url, studies)
        vectors = fill_embeddings(url, studies, dim, model_id)
        port = free_port()
        config = write_config(
            root / "precedent.toml",
            f'[dicom]\nbind = "127.0.0.1"\nport = {port}\n'
            f'[storage]\ndata_dir = "{root / "data"}"\nmin_free_bytes = 0\n'
            f'[catalog]\nurl = "{url}"\n'
            f'[model]\nbundle = "{bundle}"\n[queue]\nserve_workers = 0\n'
            f"[similarity]\nk = {K}\n",
        )
        settings = load_settings(config)
        node = NodeProcess(config, root / "precedent.log")
        node.start(timeout=120)
        try:
            snapshot = index_snapshot(settings, model_id)
            assert snapshot is not None
            _wait_for(snapshot)
            index = SimilarityIndex(model_id, index_options(settings), snapshot)
            assert index.load(), "the node's snapshot could not be opened"
            chosen = random.Random(1).sample(range(studies), min(queries, studies))
            figures: dict[str, list[float]] = {"node": [], "index": []}
            with association(port, "PRECEDENT_SIM") as assoc:
                for warm in chosen[:3]:
                    node_find(assoc, request(warm))
                for study in chosen:
                    seconds, matches, failures = node_find(assoc, request(study))
                    assert not failures and matches == min(K, studies - 2), (failures, matches)
                    figures["node"].append(seconds)
                    started = time.perf_counter()
                    index.search(vectors[study : study + 1], K + 1, exclude=(study + 1,))
                    figures["index"].append(time.perf_counter() - started)
            return figures, str(index.kind)
        finally:
            node.signal(signal.SIGTERM)
            node.wait(60)


def _wait_for(snapshot: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not snapshot.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the node never wrote its index snapshot")
        time.sleep(0.2)
    time.sleep(0.5)


def report(figures: dict[str, list[float]], kind: str) -> str:
    node, index = figures["node"], figures["index"]
    lines = [f"index: {kind}; {len(node)} queries, k = {K}", f"{'':34} {'p50 ms':>8} {'p99 ms':>8}"]
    for name, values in (("similarity C-FIND over DICOM", node), ("FAISS index search alone", index)):
        lines.append(f"{name:34} {1000 * percentile(values, 50):8.2f} {1000 * percentile(values, 99):8.2f}")
    lines.append(f"ratio C-FIND / index (p50): {statistics.median(node) / statistics.median(index):.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    figures, kind = run(args.studies, args.dim, args.queries)
    print(f"{args.studies} studies, {args.dim}-d embeddings")
    print(report(figures, kind))


if __name__ == "__main__":
    main()
