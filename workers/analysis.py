"""The analysis pipeline: decode → preprocess → model → embedding → Grad-CAM, in batches.

Decoding and preprocessing run in a small thread pool (the decoders and torch release
the GIL) while the model works on the images already decoded. Images are batched across
instances and frames; Grad-CAM runs once per instance, on the frame that is reported.
An image that cannot be decoded is a result too (failed or skipped, with its reason),
never an exception that would fail its batch-mates.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from node.catalog.analyses import AnalysisOutcome, AnalysisResult, AnalysisTarget
from node.catalog.work import FAILED, SKIPPED
from node.errors import ModelConfigError
from node.settings import ModelSettings
from workers.bundles import ModelBundle
from workers.decode import DecodedImage, NotAnImage, PixelError, decode_for_analysis
from workers.explain import gradcam_heatmaps
from workers.preprocess import preprocess

log = logging.getLogger(__name__)

# Decoding is the pipeline's bottleneck in front of a GPU (~50 ms per ultrasound frame on
# one core against well under 1 ms of model time): use the host's cores, within reason.
_DECODE_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


class AnalysisSetupError(ModelConfigError):
    """The model settings cannot work with this bundle or machine; says which key."""


def choose_device(setting: str) -> torch.device:
    """``auto`` takes CUDA when torch sees a GPU; ``cuda`` without one is a setup error."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AnalysisSetupError("model.device = cuda, but torch sees no CUDA device")
    return torch.device("cuda")


def threads_for(setting: int, processes: int) -> int:
    """The machine's cores shared among this host's worker processes, unless set."""
    return setting or max(1, (os.cpu_count() or 1) // max(1, processes))


@dataclass
class _Item:
    """One frame of one instance on its way through the model."""

    target: int  # index into the batch's targets
    frame_index: int
    crop: tuple[int, int, int, int]
    tensor: torch.Tensor
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    embedding: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class _Decoded:
    image: DecodedImage | None
    outcome: AnalysisOutcome | None
    seconds_decode: float
    items: list[_Item] = field(default_factory=list)
    seconds_preprocess: float = 0.0


class Analyzer:
    """A loaded model and the settings it runs under; one per worker process."""

    def __init__(self, bundle: ModelBundle, settings: ModelSettings, *, processes: int = 1) -> None:
        self.bundle = bundle
        self.settings = settings
        self.labels = list(bundle.labels)
        self.device = choose_device(settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads_for(settings.threads, processes))
        self.model = bundle.instantiate(self.device)
        self.gradcam_class = self._gradcam_class(settings.gradcam_label)
        # Expected severity per label (labels are listed in ascending severity).
        self._severity = np.arange(len(self.labels), dtype=np.float32)
        self._pool = ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="decode")

    def _gradcam_class(self, label: str) -> int | None:
        if not label:
            return None
        if label not in self.labels:
            raise AnalysisSetupError(
                f"model.gradcam_label {label!r} is not a label of the bundle ({', '.join(self.labels)})"
            )
        return self.labels.index(label)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def analyse(
        self, targets: Sequence[AnalysisTarget], data_dir: Path
    ) -> list[AnalysisResult | AnalysisOutcome]:
        """Analyse a batch of stored instances; one result or outcome per target, in order."""
        started = time.perf_counter()
        futures = [self._pool.submit(self._decode, data_dir / t.file_path) for t in targets]
        decoded: list[_Decoded] = []
        seconds_model = 0.0
        for chunk in self._chunks(futures, decoded):
            seconds_model += self._forward(chunk)
        reported = [self._reported(d.items) if d.outcome is None else None for d in decoded]
        chosen = [item for item in reported if item is not None]
        heatmaps, seconds_gradcam = self._explain(chosen)
        per_image = {
            "model": seconds_model / max(1, len(chosen)),
            "gradcam": seconds_gradcam / max(1, len(chosen)),
            "batch_total": time.perf_counter() - started,
            "batch_images": float(len(targets)),
        }
        results: list[AnalysisResult | AnalysisOutcome] = []
        for target, d, item in zip(targets, decoded, reported, strict=True):
            if item is None:
                assert d.outcome is not None
                results.append(AnalysisOutcome(target.analysis_id, d.outcome.state, d.outcome.reason))
                continue
            timings = {"decode": d.seconds_decode, "preprocess": d.seconds_preprocess, **per_image}
            results.append(self._result(target, d.items, item, heatmaps.get(id(item)), timings))
        return results

    def _decode(self, path: Path) -> _Decoded:
        """Runs in the pool: read the file's frames. Nothing here may call torch: a torch
        operation in a second thread gives the process a second OpenMP team, and the
        model's forward then ran ~40 % slower for good (measured: 35.6 → 48.9 ms/image)."""
        started = time.perf_counter()
        try:
            image = decode_for_analysis(path, self.settings.frame_policy, max_frames=self.settings.max_frames)
        except NotAnImage as exc:
            return _Decoded(None, AnalysisOutcome(-1, SKIPPED, str(exc)), time.perf_counter() - started)
        except PixelError as exc:
            return _Decoded(None, AnalysisOutcome(-1, FAILED, str(exc)), time.perf_counter() - started)
        except OSError as exc:
            reason = f"stored file unreadable: {exc.strerror or exc}"
            return _Decoded(None, AnalysisOutcome(-1, FAILED, reason), time.perf_counter() - started)
        return _Decoded(image, None, time.perf_counter() - started)

    def _preprocessed(self, image: DecodedImage, target: int) -> list[_Item]:
        spec = self.bundle.input
        return [_Item(target, f.index, f.crop, preprocess(f.pixels, spec)) for f in image.frames]

    def _chunks(self, futures: list[Future[_Decoded]], decoded: list[_Decoded]) -> Iterator[list[_Item]]:
        """Frames in batches of ``model.batch_size``, each yielded as soon as it is full, so
        the model runs while later files are still being decoded."""
        waiting: list[_Item] = []
        for target, future in enumerate(futures):
            result = future.result()
            if result.image is not None:  # preprocessed here, in the model's thread (see _decode)
                started = time.perf_counter()
                result.items = self._preprocessed(result.image, target)
                result.seconds_preprocess = time.perf_counter() - started
            decoded.append(result)
            waiting.extend(result.items)
            while len(waiting) >= self.settings.batch_size:
                yield waiting[: self.settings.batch_size]
                waiting = waiting[self.settings.batch_size :]
        if waiting:
            yield waiting

    def _forward(self, items: list[_Item]) -> float:
        started = time.perf_counter()
        batch = torch.stack([item.tensor for item in items]).to(self.device)
        with torch.inference_mode():
            embedding = self.model.embed(batch)
            probabilities = torch.softmax(self.model.classify(embedding), dim=1)
        for item, p, e in zip(
            items, probabilities.cpu().numpy(), embedding.float().cpu().numpy(), strict=True
        ):
            item.probabilities = p
            item.embedding = e
        return time.perf_counter() - started

    def _reported(self, items: list[_Item]) -> _Item:
        """The frame an instance is reported by: the most suspicious one (highest expected
        severity); a single-frame image has only one."""
        return max(items, key=lambda item: float(item.probabilities @ self._severity))

    def _explain(self, items: list[_Item]) -> tuple[dict[int, tuple[bytes, int, str]], float]:
        if not self.settings.gradcam or not items:
            return {}, 0.0
        started = time.perf_counter()
        heatmaps: dict[int, tuple[bytes, int, str]] = {}
        size = self.settings.batch_size
        for first in range(0, len(items), size):
            chunk = items[first : first + size]
            classes = [self._explained_class(item) for item in chunk]
            batch = torch.stack([item.tensor for item in chunk]).to(self.device)
            maps = gradcam_heatmaps(self.model, batch, classes)
            for item, heatmap, cls in zip(chunk, maps, classes, strict=True):
                heatmaps[id(item)] = (_encode_heatmap(heatmap), int(heatmap.shape[0]), self.labels[cls])
        return heatmaps, time.perf_counter() - started

    def _explained_class(self, item: _Item) -> int:
        return self.gradcam_class if self.gradcam_class is not None else int(item.probabilities.argmax())

    def _result(
        self,
        target: AnalysisTarget,
        items: list[_Item],
        item: _Item,
        heatmap: tuple[bytes, int, str] | None,
        timings: dict[str, float],
    ) -> AnalysisResult:
        frames = None
        if self.settings.frame_policy == "each" and len(items) > 1:
            frames = [{"frame": i.frame_index, "probabilities": self._named(i.probabilities)} for i in items]
        return AnalysisResult(
            analysis_id=target.analysis_id,
            predicted_label=self.labels[int(item.probabilities.argmax())],
            probabilities=self._named(item.probabilities),
            frame_index=item.frame_index,
            frames=frames,
            crop=item.crop,
            embedding=item.embedding,
            heatmap=heatmap[0] if heatmap else None,
            heatmap_size=heatmap[1] if heatmap else None,
            heatmap_label=heatmap[2] if heatmap else None,
            timings={k: round(v, 6) for k, v in timings.items()},
        )

    def _named(self, probabilities: np.ndarray) -> dict[str, float]:
        return {label: float(p) for label, p in zip(self.labels, probabilities, strict=True)}


def _encode_heatmap(heatmap: np.ndarray) -> bytes:
    """uint8, zlib: a 224 x 224 heatmap keeps in ~10-30 KB of catalog."""
    quantised = np.clip(np.rint(heatmap * 255.0), 0, 255).astype(np.uint8)
    return zlib.compress(quantised.tobytes(), level=1)


def decode_heatmap(data: bytes, size: int) -> np.ndarray:
    """The inverse of the encoding above: float32 (size, size) in [0, 1]."""
    return np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(size, size).astype(np.float32) / 255.0
