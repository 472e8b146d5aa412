"""Synthetic breast ultrasound phantoms: labelled B-mode images for the demo and the tests.

No clinical breast images can be had here (DESIGN.md, "Test data"), so the demo, the tests and a
first training run need images whose class shows in the pixels the way it does in real breast
ultrasound, and whose difficulty is honest: the classes overlap, and nothing but the lesion
tells them apart. Each image is simulated, not drawn:

- **tissue** is a map of echogenicity (in dB) with the layers a linear breast probe sees: skin,
  subcutaneous fat with lobules and Cooper's ligaments, the fibroglandular layer with its
  fibrous texture and ducts, retromammary fat, pectoral muscle, and at depth pleura and ribs;
- **speckle** comes from scatterers: complex Gaussian noise weighted by the echogenicity and
  blurred by an anisotropic point-spread function (wider laterally than axially), whose
  magnitude is Rayleigh distributed with the grain of real B-mode images;
- **attenuation** accumulates with depth and the time-gain compensation only partly undoes it,
  so lesions that attenuate more or less than tissue cast posterior shadows or enhancement by
  the same mechanism as in a patient; gain, dynamic range and noise vary per image;
- **lesions** follow the BI-RADS ultrasound lexicon. Benign: oval, circumscribed, parallel
  (wider than tall), homogeneous and hypoechoic (some anechoic cysts), posterior enhancement.
  Malignant: irregular with angular or spiculated margins, not parallel (taller than wide),
  heterogeneous, often an echogenic halo and microcalcifications, posterior shadowing. Each
  feature is drawn from a distribution, and the distributions overlap (some benign lesions are
  lobulated or round or shadow a little, some malignant ones are wider than tall or enhance),
  as real lesions do. Normal images have no lesion but keep the look-alikes (fat lobules,
  ducts, ligament and rib shadows).

The files are written in two layouts: DICOM Ultrasound Image Storage objects grouped into
patients, studies and series, as a modality would send them, and BUSI's folder-per-class PNG
layout. Everything is deterministic for a seed, down to the bytes. Results obtained on these
images are results on phantoms and are labelled as such wherever they appear.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, UltrasoundImageStorage

from workers.derived_uids import derived_uid

Label = Literal["normal", "benign", "malignant"]
LABELS: tuple[Label, ...] = get_args(Label)
DEFAULT_SIZE = (256, 256)
"""(rows, columns) of the imaged region; BUSI's images are of this order after resizing."""

SYNTHETIC_MARKER = "synthetic phantom - not for clinical use"
"""In every DICOM phantom's Image Comments, so no one mistakes one for a patient's image."""

MANUFACTURER = "Precedent phantom"
MANIFEST = "labels.csv"

_MIN_SIDE = 32
_ANGLES = 360  # samples of a lesion's radius function r(theta)
_FIRST_STUDY_DAY = datetime.date(2019, 1, 7)
_STUDY_SPAN_DAYS = 4 * 365
_FRAME_MARGINS = (40, 64, 24, 64)  # black surround of the imaged region: top, left, bottom, right
_BURNED_IN = 180  # grey level of the text-free graphics in the surround


# --- lesions ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Lesion:
    """One lesion's appearance, in physical units so that it looks the same in every view of it.

    Sizes are millimetres; echogenicities dB (the lesion's relative to subcutaneous fat, the
    lexicon's reference, halo and capsule relative to the tissue around); the posterior
    change is the dB gained (enhancement, > 0) or lost (shadowing, < 0) behind the lesion's
    thickest column. ``radius`` is the outline as a multiple of the ellipse with semi-axes
    ``half_width_mm`` and ``half_height_mm``, sampled at ``_ANGLES`` evenly spaced angles.
    """

    label: Label
    half_width_mm: float
    half_height_mm: float
    tilt: float  # radians, positive turns the lateral axis clockwise on the screen
    radius: np.ndarray
    depth: float  # of the centre, as a fraction of the fibroglandular layer (< 0: in the fat)
    lateral: float  # of the centre, as a fraction of the image width
    echo_db: float
    heterogeneity_db: float
    edge_blur_mm: float
    posterior_db: float
    halo_db: float
    capsule_db: float
    edge_shadow_db: float
    spicules: int
    calcifications: int

    def seen_again(self, rng: np.random.Generator) -> Lesion:
        """The same lesion in another image of the study: the probe moved and turned a little."""
        return dataclasses.replace(
            self,
            tilt=self.tilt + float(rng.normal(0.0, 0.08)),
            depth=self.depth + float(rng.normal(0.0, 0.08)),
            lateral=float(np.clip(self.lateral + rng.normal(0.0, 0.06), 0.3, 0.7)),
            radius=np.roll(self.radius, int(rng.integers(-4, 5))),
        )


def sample_lesion(label: Label, rng: np.random.Generator) -> Lesion | None:
    """A lesion of class ``label`` drawn from the class's distribution; None for "normal"."""
    if label == "normal":
        return None
    if label == "benign":
        return _benign_lesion(rng)
    if label == "malignant":
        return _malignant_lesion(rng)
    raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")


def _benign_lesion(rng: np.random.Generator) -> Lesion:
    """Oval, circumscribed, parallel, homogeneous, hypoechoic or anechoic, enhancing: mostly."""
    width = float(rng.uniform(6.0, 20.0))
    aspect = float(np.clip(np.exp(rng.normal(math.log(1.55), 0.3)), 0.8, 2.8))  # wide / tall
    cyst = rng.random() < 0.2
    posterior = rng.choice(3, p=[0.65, 0.25, 0.10])  # enhancement, none, a little shadowing
    return Lesion(
        label="benign",
        half_width_mm=width / 2,
        half_height_mm=width / 2 / aspect,
        tilt=float(rng.normal(0.0, 0.12)),
        radius=_benign_outline(rng),
        depth=float(rng.uniform(-0.1, 0.8)),
        lateral=float(rng.uniform(0.3, 0.7)),
        echo_db=float(rng.uniform(-26.0, -20.0) if cyst else rng.uniform(-10.0, -3.0)),
        heterogeneity_db=float(rng.uniform(2.5, 5.0) if rng.random() < 0.15 else rng.uniform(0.3, 1.8)),
        edge_blur_mm=float(rng.uniform(0.05, 0.2)),
        posterior_db=float(
            (rng.uniform(5.0, 13.0), rng.uniform(-2.0, 2.0), rng.uniform(-9.0, -4.0))[posterior]
        ),
        halo_db=0.0,
        capsule_db=float(rng.uniform(3.0, 7.0) if rng.random() < 0.5 else 0.0),
        edge_shadow_db=float(rng.uniform(6.0, 14.0) if rng.random() < 0.4 else 0.0),
        spicules=0,
        calcifications=int(rng.integers(1, 4)) if rng.random() < 0.08 else 0,
    )


def _malignant_lesion(rng: np.random.Generator) -> Lesion:
    """Irregular, angular or spiculated, not parallel, heterogeneous, shadowing: mostly."""
    width = float(rng.uniform(7.0, 20.0))
    aspect = float(np.clip(np.exp(rng.normal(math.log(1.2), 0.25)), 0.7, 1.9))  # tall / wide
    posterior = rng.choice(3, p=[0.6, 0.25, 0.15])  # shadowing, none, enhancement
    return Lesion(
        label="malignant",
        half_width_mm=width / 2,
        half_height_mm=width / 2 * aspect,
        tilt=float(rng.normal(0.0, 0.25)),
        radius=_malignant_outline(rng),
        depth=float(rng.uniform(0.1, 0.9)),
        lateral=float(rng.uniform(0.3, 0.7)),
        echo_db=float(rng.uniform(-11.0, -3.0)),
        heterogeneity_db=float(rng.uniform(3.0, 7.0)),
        edge_blur_mm=float(rng.uniform(0.2, 0.6)),
        posterior_db=float(
            (rng.uniform(-24.0, -9.0), rng.uniform(-3.0, 2.0), rng.uniform(3.0, 9.0))[posterior]
        ),
        halo_db=float(rng.uniform(5.0, 10.0) if rng.random() < 0.5 else 0.0),
        capsule_db=0.0,
        edge_shadow_db=0.0,
        spicules=int(rng.integers(4, 14)) if rng.random() < 0.7 else 0,
        calcifications=int(rng.integers(2, 9)) if rng.random() < 0.4 else 0,
    )


def _benign_outline(rng: np.random.Generator) -> np.ndarray:
    """Nearly an ellipse; a quarter gently macrolobulated, a few slightly irregular."""
    theta = np.linspace(0.0, 2 * np.pi, _ANGLES, endpoint=False)
    radius = 1.0 + _harmonics(rng, theta, range(2, 6), 0.0, 0.03)
    if rng.random() < 0.25:
        lobes = int(rng.integers(2, 5))
        radius += _harmonics(rng, theta, range(lobes, lobes + 1), 0.05, 0.09)
    if rng.random() < 0.2:
        radius += _harmonics(rng, theta, range(6, 13), 0.01, 0.03)
    return radius


def _malignant_outline(rng: np.random.Generator) -> np.ndarray:
    """Angular corners (straight edges between random vertices), microlobulation, spikes."""
    theta = np.linspace(0.0, 2 * np.pi, _ANGLES, endpoint=False)
    vertices = int(rng.integers(5, 11))
    corners = np.sort(rng.uniform(0.0, 2 * np.pi, vertices))
    spread = float(rng.uniform(0.05, 0.3))
    radii = 1.0 + rng.uniform(-spread, spread, vertices)
    radius = np.interp(theta, corners, radii, period=2 * np.pi)
    radius += _harmonics(rng, theta, range(8, 17), 0.0, 0.02)
    for _ in range(int(rng.integers(0, 9))):
        centre, width = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.03, 0.07)
        offset = np.angle(np.exp(1j * (theta - centre)))
        radius += rng.uniform(0.2, 0.55) * np.exp(-0.5 * (offset / width) ** 2)
    return np.maximum(radius, 0.5)


def _harmonics(
    rng: np.random.Generator, theta: np.ndarray, orders: range, low: float, high: float
) -> np.ndarray:
    total = np.zeros_like(theta)
    for k in orders:
        total += rng.uniform(low, high) * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi))
    return total


# --- images ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Phantom:
    """One simulated image: pixels, lesion mask (255 inside, as BUSI's masks) and pixel size."""

    label: Label
    image: np.ndarray
    mask: np.ndarray
    spacing_mm: float


def make_phantom(
    label: Label, rng: np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """A B-mode image of class ``label`` and its lesion mask, both uint8 of shape ``size``.

    The mask is 255 inside the lesion and 0 elsewhere, empty for "normal". Everything random is
    drawn from ``rng``, so the same generator state gives the same pixels.
    """
    phantom = render_phantom(sample_lesion(label, rng), rng, size)
    return phantom.image, phantom.mask


def render_phantom(
    lesion: Lesion | None, rng: np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE
) -> Phantom:
    """An image of ``lesion`` (None: a normal image) in freshly drawn anatomy and scanner settings.

    With a lesion from :func:`sample_lesion` this is :func:`make_phantom`; given the same lesion
    again (or :meth:`Lesion.seen_again`) it shows one lesion in several images, as a study does.
    """
    rows, columns = _checked_size(size)
    spacing = float(rng.uniform(30.0, 45.0)) / rows  # mm per pixel: the field of view's depth
    tissue = _tissue(rng, rows, columns, spacing)
    mask = np.zeros((rows, columns), dtype=bool)
    if lesion is not None:
        mask = _insert_lesion(tissue, lesion, rng, spacing)
    image = _b_mode(tissue, rng, spacing)
    label: Label = "normal" if lesion is None else lesion.label
    return Phantom(label, image, np.where(mask, 255, 0).astype(np.uint8), spacing)


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    rows, columns = (int(side) for side in size)
    if rows < _MIN_SIDE or columns < _MIN_SIDE:
        raise ValueError(f"phantom size {size} too small: each side must be at least {_MIN_SIDE} pixels")
    return rows, columns


@dataclass
class _Tissue:
    """What the probe insonifies: echogenicity (dB), attenuation (dB per pixel, round trip)."""

    echo: np.ndarray
    attenuation: np.ndarray
    fat_db: float  # echo level of the fat, the reference for a lesion's
    skin_bottom: np.ndarray  # depths of layer boundaries, (1, columns), in pixels
    gland_top: np.ndarray
    gland_bottom: np.ndarray
    mean_attenuation: float


def _tissue(rng: np.random.Generator, rows: int, columns: int, spacing: float) -> _Tissue:
    """The layers of the breast and chest wall, each with its own echo level and texture."""
    mm = 1.0 / spacing  # pixels per millimetre
    y = np.arange(rows, dtype=np.float32)[:, None]
    skin_top = _curve(rng, columns, float(rng.uniform(0.0, 0.6)) * mm, 0.2 * mm)
    skin_bottom = skin_top + float(rng.uniform(1.5, 2.6)) * mm
    fat_bottom = skin_bottom + _curve(rng, columns, float(rng.uniform(4.0, 13.0)) * mm, 2.0 * mm)
    # The breast lies on the chest wall, which is nearly flat: the gland ends where it begins.
    muscle_thickness, retro_thickness = float(rng.uniform(4.0, 9.0)) * mm, float(rng.uniform(1.0, 3.0)) * mm
    gland_thickness = float(rng.uniform(9.0, 20.0)) * mm
    chest_depth = float(fat_bottom.mean()) + gland_thickness
    muscle_bottom = _curve(rng, columns, chest_depth + retro_thickness + muscle_thickness, 0.5 * mm)
    retro_bottom = muscle_bottom - muscle_thickness
    gland_bottom = np.minimum(
        fat_bottom + _curve(rng, columns, gland_thickness - 2.0 * mm, 2.0 * mm),
        retro_bottom - retro_thickness,
    )
    gland_bottom = np.maximum(gland_bottom, fat_bottom + 2.0 * mm)
    retro_bottom = np.maximum(retro_bottom, gland_bottom + retro_thickness)
    fat_db = float(rng.uniform(-15.0, -10.0))
    fat = fat_db + _texture(rng, rows, columns, (8, 12), 2.0)
    layers = [  # (from the surface down) bottom boundary, echo level, attenuation factor
        (skin_top, -8.0, 1.0),
        (skin_bottom, 12.0 + 0.5 * (fat - fat_db), 1.0),
        (fat_bottom, fat, 0.8),
        (gland_bottom, _glandular_texture(rng, rows, columns), 1.15),
        (retro_bottom, fat, 0.8),
        (muscle_bottom, _muscle_texture(rng, rows, columns), 1.0),
    ]
    echo = np.full((rows, columns), -6.0, dtype=np.float32)  # chest wall and below
    factor = np.ones((rows, columns), dtype=np.float32)
    for bottom, level, attenuates in reversed(layers):
        above = _soft_step(bottom - y, 0.4 * mm)
        echo = above * level + (1.0 - above) * echo
        factor = above * attenuates + (1.0 - above) * factor
    mean_attenuation = float(rng.uniform(25.0, 45.0)) / rows
    tissue = _Tissue(
        echo, factor * mean_attenuation, fat_db, skin_bottom, fat_bottom, gland_bottom, mean_attenuation
    )
    _add_fat_lobules(tissue, rng, skin_bottom, fat_bottom, fat_db, mm)
    _add_ligaments(tissue, rng, skin_bottom, fat_bottom, mm)
    _add_ducts(tissue, rng, fat_bottom, gland_bottom, mm)
    _add_chest_wall(tissue, rng, muscle_bottom, mm)
    return tissue


def _curve(rng: np.random.Generator, columns: int, mean: float, amplitude: float) -> np.ndarray:
    """A smooth boundary across the image: ``mean`` plus a few slow random undulations."""
    x = np.linspace(0.0, 1.0, columns, dtype=np.float32)
    curve = np.full(columns, mean, dtype=np.float32)
    for cycles in (0.5, 1.0, 2.0):
        curve += amplitude / cycles * np.sin(2 * np.pi * (cycles * x + rng.random())).astype(np.float32)
    return curve[None, :]


def _soft_step(distance: np.ndarray, width: float) -> np.ndarray:
    """1 where ``distance`` > 0, 0 where < 0, with a ramp of about ``width`` pixels."""
    return np.clip(0.5 + distance / max(width, 1e-3), 0.0, 1.0).astype(np.float32)


def _texture(
    rng: np.random.Generator, rows: int, columns: int, grid: tuple[int, int], std_db: float
) -> np.ndarray:
    """Smooth random variation of echo level: a coarse random grid interpolated to full size.

    ``grid`` (rows, columns) sets the grain; more columns than rows per pixel stretches the
    texture laterally, as fibrous breast tissue is stretched along the skin.
    """
    coarse = rng.normal(0.0, std_db, grid).astype(np.float32)
    return np.asarray(cv2.resize(coarse, (columns, rows), interpolation=cv2.INTER_LINEAR))


def _glandular_texture(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Echogenic fibroglandular tissue: patchy on a large scale, streaky along the skin."""
    patches = _texture(rng, rows, columns, (6, 6), float(rng.uniform(2.0, 4.0)))
    streaks = _texture(rng, rows, columns, (max(rows // 5, 4), max(columns // 24, 4)), 3.0)
    texture: np.ndarray = patches + streaks + float(rng.uniform(-2.0, 2.0))
    return texture


def _muscle_texture(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Pectoralis: hypoechoic with bright fibrillar striations that run along the muscle."""
    striations = _texture(rng, rows, columns, (max(rows // 4, 4), max(columns // 40, 3)), 4.0)
    texture: np.ndarray = -8.0 + np.maximum(striations, -3.0)
    return texture


def _add_fat_lobules(
    tissue: _Tissue,
    rng: np.random.Generator,
    top: np.ndarray,
    bottom: np.ndarray,
    fat_db: float,
    mm: float,
) -> None:
    """Fat lobules: hypoechoic ovals with thin echogenic septa, the classic look-alike of a mass."""
    columns = tissue.echo.shape[1]
    for _ in range(int(rng.integers(2, 7))):
        x = int(rng.integers(0, columns))
        y0, y1 = float(top[0, x]), float(bottom[0, x])
        if y1 - y0 < 2 * mm:
            continue
        centre = (x, int(rng.uniform(y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0))))
        axes = (int(rng.uniform(2.0, 5.0) * mm), max(int(0.35 * (y1 - y0) * rng.uniform(0.6, 1.0)), 2))
        angle = float(rng.normal(0.0, 8.0))
        cv2.ellipse(tissue.echo, centre, axes, angle, 0, 360, fat_db - float(rng.uniform(1.0, 4.0)), -1)
        cv2.ellipse(tissue.echo, centre, axes, angle, 0, 360, fat_db + 8.0, 1)


def _add_ligaments(
    tissue: _Tissue, rng: np.random.Generator, top: np.ndarray, bottom: np.ndarray, mm: float
) -> None:
    """Cooper's ligaments: echogenic arcs from the gland to the skin, shadowing a little."""
    columns = tissue.echo.shape[1]
    for _ in range(int(rng.integers(1, 5))):
        x0 = float(rng.uniform(0, columns))
        lean = float(rng.uniform(-1.5, 1.5))
        depths = np.linspace(0.0, 1.0, 12)
        xs = np.clip(x0 + lean * (bottom[0, int(x0)] - top[0, int(x0)]) * depths**1.5, 0, columns - 1)
        ys = top[0, xs.astype(int)] + depths * (bottom[0, xs.astype(int)] - top[0, xs.astype(int)] + mm)
        points = np.stack([xs, ys], axis=1).round().astype(np.int32)
        cv2.polylines(tissue.echo, [points], False, float(rng.uniform(0.0, 6.0)), 1)
        if rng.random() < 0.4:
            line = np.zeros_like(tissue.attenuation)
            cv2.polylines(line, [points], False, float(rng.uniform(0.5, 1.5)), 1)
            tissue.attenuation += line


def _add_ducts(
    tissue: _Tissue, rng: np.random.Generator, top: np.ndarray, bottom: np.ndarray, mm: float
) -> None:
    """Lactiferous ducts: thin anechoic tubes running through the gland towards the nipple."""
    columns = tissue.echo.shape[1]
    for _ in range(int(rng.choice(3, p=[0.5, 0.35, 0.15]))):
        xs = np.linspace(float(rng.uniform(-0.2, 0.3)), float(rng.uniform(0.7, 1.2)), 10) * columns
        columns_at = np.clip(xs, 0, columns - 1).astype(int)
        fraction = float(rng.uniform(0.2, 0.8))
        ys = top[0, columns_at] + fraction * (bottom[0, columns_at] - top[0, columns_at])
        ys = ys + float(rng.uniform(-1.0, 1.0)) * mm * np.sin(np.linspace(0.0, np.pi, 10))
        points = np.stack([xs, ys], axis=1).round().astype(np.int32)
        width = max(int(rng.uniform(0.4, 1.2) * mm), 1)
        cv2.polylines(tissue.echo, [points], False, float(rng.uniform(-24.0, -14.0)), width)


def _add_chest_wall(tissue: _Tissue, rng: np.random.Generator, muscle_bottom: np.ndarray, mm: float) -> None:
    """Behind the muscle: the bright pleural line with reverberations, and a rib that shadows."""
    rows, columns = tissue.echo.shape
    pleura = muscle_bottom + float(rng.uniform(1.0, 3.0)) * mm
    if float(pleura.min()) >= rows:
        return
    xs = np.arange(columns)
    for repeat, level in ((1, 12.0), (2, 2.0)):  # the pleura and its first reverberation
        ys = (pleura[0] * repeat).round().astype(np.int32)
        points = np.stack([xs, ys], axis=1).astype(np.int32)
        cv2.polylines(tissue.echo, [points], False, level, max(int(0.4 * mm), 1))
    if rng.random() < 0.35:
        centre = (int(rng.uniform(0.15, 0.85) * columns), int(pleura[0].mean() - 2.5 * mm))
        axes = (int(rng.uniform(5.0, 9.0) * mm), int(rng.uniform(2.0, 3.0) * mm))
        cv2.ellipse(tissue.echo, centre, axes, 0.0, 0, 360, -4.0, -1)
        cv2.ellipse(tissue.echo, centre, axes, 0.0, 180, 360, 14.0, max(int(0.5 * mm), 1))
        cv2.ellipse(tissue.attenuation, centre, axes, 0.0, 0, 360, 40.0 / axes[1], -1)


def _insert_lesion(tissue: _Tissue, lesion: Lesion, rng: np.random.Generator, spacing: float) -> np.ndarray:
    """Paint ``lesion`` into the tissue maps; the mask of the lesion proper (no halo, no spicules).

    Each random feature draws from its own stream, so a lesion rendered again without one of
    them (no spicules, say) gives the same image but for that feature.
    """
    texture_rng, spicule_rng, calcification_rng = (
        np.random.default_rng(seed) for seed in rng.integers(0, 2**63, size=3)
    )
    rows, columns = tissue.echo.shape
    mm = 1.0 / spacing
    half_width, half_height = lesion.half_width_mm * mm, lesion.half_height_mm * mm
    extent = float(lesion.radius.max()) * max(half_width, half_height)
    # Room above for skin and fat, below for what the lesion does to the posterior echoes.
    scale = min(1.0, 0.25 * rows / extent, 0.3 * columns / extent)
    half_width, half_height, extent = half_width * scale, half_height * scale, extent * scale
    cx = lesion.lateral * columns
    column = int(np.clip(cx, 0, columns - 1))
    skin, top = float(tissue.skin_bottom[0, column]), float(tissue.gland_top[0, column])
    depth = top + lesion.depth * (float(tissue.gland_bottom[0, column]) - top)
    cy = float(np.clip(depth, skin + 1.0 * mm + extent, 0.72 * rows - extent))
    mask = _outline_mask(lesion, rows, columns, (cy, cx), (half_width, half_height))
    inside = mask.astype(np.float32)
    edge = cv2.GaussianBlur(inside, (0, 0), max(lesion.edge_blur_mm * mm, 0.3))
    interior: np.ndarray = (
        tissue.fat_db + lesion.echo_db + _texture(texture_rng, rows, columns, (8, 8), lesion.heterogeneity_db)
    )
    if lesion.heterogeneity_db > 2.0:
        interior += _texture(texture_rng, rows, columns, (24, 24), 0.6 * lesion.heterogeneity_db)
    tissue.echo[:] = (1.0 - edge) * tissue.echo + edge * interior
    _add_rim(tissue, inside, lesion.halo_db, 1.2 * mm)
    _add_rim(tissue, inside, lesion.capsule_db, 0.3 * mm)
    _add_spicules(tissue, spicule_rng, lesion, (cy, cx), (half_width, half_height), mm)
    _add_calcifications(tissue, calcification_rng, mask, lesion.calcifications)
    _add_posterior_change(tissue, mask, lesion.posterior_db)
    _add_edge_shadows(tissue, mask, lesion.edge_shadow_db)
    return mask


def _outline_mask(
    lesion: Lesion, rows: int, columns: int, centre: tuple[float, float], half_axes: tuple[float, float]
) -> np.ndarray:
    """The pixels inside the lesion's outline."""
    cy, cx = centre
    half_width, half_height = half_axes
    reach = float(lesion.radius.max()) * max(half_width, half_height) + 2.0
    top, bottom = max(int(cy - reach), 0), min(int(cy + reach) + 1, rows)
    left, right = max(int(cx - reach), 0), min(int(cx + reach) + 1, columns)
    y, x = np.mgrid[top:bottom, left:right].astype(np.float32)
    dx, dy = x - cx, y - cy
    cos, sin = math.cos(lesion.tilt), math.sin(lesion.tilt)
    u = (dx * cos + dy * sin) / half_width
    v = (-dx * sin + dy * cos) / half_height
    # radius[i] is r at the angle -pi + 2*pi*i/_ANGLES in the lesion's own (u, v) frame.
    index = ((np.arctan2(v, u) + np.pi) * (_ANGLES / (2 * np.pi))).astype(np.int32) % _ANGLES
    mask = np.zeros((rows, columns), dtype=bool)
    mask[top:bottom, left:right] = np.hypot(u, v) < lesion.radius[index]
    return mask


def _add_rim(tissue: _Tissue, inside: np.ndarray, level_db: float, width: float) -> None:
    """An echogenic band just outside the lesion: the halo of malignancy or a benign capsule."""
    if level_db == 0.0:
        return
    spread = cv2.GaussianBlur(inside, (0, 0), max(width, 0.5))
    rim = np.clip(3.0 * spread, 0.0, 1.0) * (1.0 - inside)
    tissue.echo += level_db * rim


def _add_spicules(
    tissue: _Tissue,
    rng: np.random.Generator,
    lesion: Lesion,
    centre: tuple[float, float],
    half_axes: tuple[float, float],
    mm: float,
) -> None:
    """Spiculation: thin lines radiating from the margin, alternately hypo- and hyperechoic.

    Half a millimetre thick or so: thinner ones vanish in the beam's lateral blur."""
    if lesion.spicules == 0:
        return
    cy, cx = centre
    cos, sin = math.cos(lesion.tilt), math.sin(lesion.tilt)
    lines = np.zeros_like(tissue.echo)
    for angle in rng.uniform(-np.pi, np.pi, lesion.spicules):
        r = float(lesion.radius[int((angle + np.pi) * _ANGLES / (2 * np.pi)) % _ANGLES])
        reach = [r * 0.9, r * float(rng.uniform(1.5, 2.4))]
        ends = []
        for k in reach:
            u, v = k * half_axes[0] * math.cos(angle), k * half_axes[1] * math.sin(angle)
            ends.append((round(cx + u * cos - v * sin), round(cy + u * sin + v * cos)))
        level = float(rng.uniform(-20.0, -12.0) if rng.random() < 0.6 else rng.uniform(6.0, 10.0))
        cv2.line(lines, ends[0], ends[1], level, max(round(float(rng.uniform(0.3, 0.7)) * mm), 1))
    tissue.echo += cv2.GaussianBlur(lines, (0, 0), 0.6)


def _add_calcifications(tissue: _Tissue, rng: np.random.Generator, mask: np.ndarray, count: int) -> None:
    """Microcalcifications: bright punctate echoes inside the mass."""
    ys, xs = np.nonzero(mask)
    if count == 0 or ys.size == 0:
        return
    chosen = rng.choice(ys.size, size=min(count, ys.size), replace=False)
    tissue.echo[ys[chosen], xs[chosen]] = float(rng.uniform(8.0, 14.0))


def _add_posterior_change(tissue: _Tissue, mask: np.ndarray, posterior_db: float) -> None:
    """Echoes from behind the lesion gain (enhancement) or lose (shadowing) ``posterior_db``.

    A lesion attenuates less or more than tissue; the difference is applied just below its
    deepest pixel in each column, in proportion to the column's thickness, so the thickest part
    casts the full change and the thin edges less. Applied inside the lesion, as the physics
    would, the change would light up or darken the lesion's own lower half: a strongly
    enhancing small cyst would then vanish, and that is not what scanners show.
    """
    thickness = mask.sum(axis=0)
    if posterior_db == 0.0 or thickness.max() == 0:
        return
    columns = np.flatnonzero(thickness)
    deepest = mask.shape[0] - 1 - np.argmax(mask[::-1, columns], axis=0)
    below = np.minimum(deepest + 1, mask.shape[0] - 1)
    tissue.attenuation[below, columns] -= posterior_db * thickness[columns] / thickness.max()


def _add_edge_shadows(tissue: _Tissue, mask: np.ndarray, shadow_db: float) -> None:
    """Refraction shadows below the smooth lateral walls of a circumscribed lesion."""
    columns_hit = np.flatnonzero(mask.any(axis=0))
    if shadow_db == 0.0 or columns_hit.size < 4:
        return
    for column in (columns_hit[0], columns_hit[-1]):
        rows_hit = np.flatnonzero(mask[:, column])
        tissue.attenuation[int(rows_hit.mean()), column] += shadow_db


def _b_mode(tissue: _Tissue, rng: np.random.Generator, spacing: float) -> np.ndarray:
    """From tissue to the displayed image: attenuation, TGC, noise, speckle, log compression."""
    rows = tissue.echo.shape[0]
    # Sound crossing a lesion is attenuated for the whole of its path below, in a beam of finite width.
    attenuation = cv2.GaussianBlur(np.cumsum(tissue.attenuation, axis=0), (0, 0), 0.25 / spacing, sigmaY=0.01)
    tgc = _tgc(rng, rows, tissue.mean_attenuation)[:, None]
    noise_db = float(rng.uniform(-52.0, -40.0))
    # Echoes are attenuated and then amplified by the TGC, receiver noise only amplified; both
    # are complex Gaussian, so their powers add before the point-spread function blurs them.
    power = np.power(np.float32(10.0), (tissue.echo - attenuation + tgc) / np.float32(10.0))
    power += np.power(np.float32(10.0), (noise_db + tgc) / np.float32(10.0))
    envelope = _speckle(np.sqrt(power), rng, spacing)
    decibels = np.float32(20.0) * np.log10(envelope + np.float32(1e-6))
    dynamic_range = float(rng.uniform(50.0, 65.0))
    level = float(rng.uniform(0.55, 0.75))  # where fibroglandular tissue lands on the grey scale
    display = (decibels / np.float32(dynamic_range) + np.float32(level)) * np.float32(255.0)
    # The scanner's own smoothing fills the deepest nulls between speckle grains.
    smoothed = cv2.GaussianBlur(display, (0, 0), float(rng.uniform(0.5, 0.9)) * 0.1 / spacing)
    return np.asarray(np.clip(smoothed, 0.0, 255.0).round(), dtype=np.uint8)


def _speckle(amplitude: np.ndarray, rng: np.random.Generator, spacing: float) -> np.ndarray:
    """Envelope of the echoes of random scatterers seen through the point-spread function.

    Complex Gaussian scatterers of the given mean ``amplitude``, blurred by a PSF much wider
    laterally (the beam) than axially (the pulse), give fully developed speckle: Rayleigh
    distributed, its grain elongated along the skin. Normalised so that the root-mean-square
    envelope equals ``amplitude`` where that varies slowly.
    """
    rows, columns = amplitude.shape
    lateral, axial = float(rng.uniform(0.35, 0.5)) / spacing, float(rng.uniform(0.09, 0.13)) / spacing
    field = rng.standard_normal((2, rows, columns), dtype=np.float32) * amplitude
    energy = _kernel_energy(lateral) * _kernel_energy(axial)
    real = cv2.GaussianBlur(field[0], (0, 0), lateral, sigmaY=axial)
    imaginary = cv2.GaussianBlur(field[1], (0, 0), lateral, sigmaY=axial)
    envelope: np.ndarray = np.sqrt((real * real + imaginary * imaginary) / np.float32(2.0 * energy))
    return envelope


def _kernel_energy(sigma: float) -> float:
    """Sum of squares of the normalised Gaussian kernel OpenCV uses for ``sigma``."""
    size = round(sigma * 8 + 1) | 1  # OpenCV's own choice of kernel size for float images
    kernel = cv2.getGaussianKernel(size, sigma)
    return float(np.sum(kernel * kernel))


def _tgc(rng: np.random.Generator, rows: int, mean_attenuation: float) -> np.ndarray:
    """Time-gain compensation: most of the average attenuation undone, slider by slider."""
    depth = np.arange(rows, dtype=np.float32)
    compensation = float(rng.uniform(0.8, 1.1)) * mean_attenuation * depth
    sliders = rng.normal(0.0, 2.0, 8)
    return compensation + np.interp(depth, np.linspace(0, rows - 1, 8), sliders).astype(np.float32)


# --- files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomPhantom:
    """One written DICOM phantom: where it is, its class, and the identifiers it carries."""

    path: Path
    label: Label
    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    accession_number: str
    study_date: str
    laterality: str


@dataclass(frozen=True)
class PngPhantom:
    """One written BUSI-style phantom: the image, its mask beside it, and its class."""

    path: Path
    mask_path: Path
    label: Label


@dataclass(frozen=True)
class _StudyPlan:
    """Who was examined when, and what was found: everything about a study but its pixels."""

    number: int  # 1-based, over the whole set
    patient: int  # 1-based
    birth_date: datetime.date
    date: datetime.date
    time: datetime.time
    study_in_patient: int
    label: Label
    laterality: str
    first_image: int  # 1-based, over the whole set
    images: int


def write_dicom_phantoms(
    out_dir: Path,
    n: int,
    seed: int,
    proportions: Mapping[Label, float] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> list[DicomPhantom]:
    """Write ``n`` DICOM Ultrasound Image Storage phantoms under ``out_dir``, and ``labels.csv``.

    Images come grouped as a modality sends them: each patient has 1-3 studies (a few months to
    a year or so apart, from 2019 on), each study one series of 1-4 images of one breast
    showing one lesion (or none) from slightly different probe positions, so a study's class is
    its lesion's. Classes are drawn per study in ``proportions`` (equal by default) and stay
    within a few images of them. Files are ``<PatientID>/STnn/IMnn.dcm``; the same ``seed``
    writes the same bytes, and different seeds different patients and UIDs. Files of the same
    names are replaced, nothing else in ``out_dir`` is touched. Returns the records in the order
    written, the manifest's order.
    """
    weights = _checked_request(n, seed, proportions)
    rows, columns = _checked_size(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[DicomPhantom] = []
    for study in _plan_studies(n, seed, weights):
        records.extend(_write_study(out_dir, study, seed, (rows, columns)))
    _write_manifest(out_dir, records)
    return records


def write_png_phantoms(
    out_dir: Path,
    n: int,
    seed: int,
    proportions: Mapping[Label, float] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> list[PngPhantom]:
    """Write ``n`` phantoms in BUSI's layout: ``<label>/<label> (<i>).png`` and ``..._mask.png``.

    ``i`` counts from 1 within each class, as in BUSI, so a training pipeline written for BUSI
    reads these unchanged. Masks are 255 inside the lesion, all 0 for normal images. The same
    ``seed`` writes the same bytes; files of the same names are replaced.
    """
    weights = _checked_request(n, seed, proportions)
    rows, columns = _checked_size(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule = np.random.default_rng([seed, 3])
    counts = dict.fromkeys(LABELS, 0)
    records = []
    for index in range(1, n + 1):
        label = _next_label(schedule, counts, weights, 1)
        counts[label] += 1
        rng = np.random.default_rng([seed, 4, index])
        phantom = render_phantom(sample_lesion(label, rng), rng, (rows, columns))
        folder = out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{label} ({counts[label]})"
        records.append(PngPhantom(folder / f"{stem}.png", folder / f"{stem}_mask.png", label))
        records[-1].path.write_bytes(_png(phantom.image))
        records[-1].mask_path.write_bytes(_png(phantom.mask))
    return records


def _checked_request(n: int, seed: int, proportions: Mapping[Label, float] | None) -> dict[Label, float]:
    """The class weights, normalised, after checking what the caller asked for."""
    if n < 1:
        raise ValueError(f"the number of phantoms must be at least 1, not {n}")
    if seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, not {seed}")
    given = dict.fromkeys(LABELS, 1.0) if proportions is None else dict(proportions)
    unknown = sorted(set(given) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown labels {unknown} in the proportions; expected some of {LABELS}")
    weights = {label: float(given.get(label, 0.0)) for label in LABELS}
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"proportions must be finite, non-negative and not all zero: {proportions}")
    total = sum(weights.values())
    return {label: weight / total for label, weight in weights.items()}


def _next_label(
    rng: np.random.Generator, counts: Mapping[Label, int], weights: Mapping[Label, float], size: int
) -> Label:
    """A class for the next ``size`` images: random in proportion, among those not ahead of their share.

    That keeps every class within one study's size of its share, without the regular cycling
    that always taking the class furthest behind would give.
    """
    total = sum(counts.values()) + size
    # One class at least is behind: the counts sum to less than ``total``, the shares to it.
    allowed = [label for label in LABELS if weights[label] > 0 and counts[label] < weights[label] * total]
    chances = np.array([weights[label] for label in allowed])
    return allowed[int(rng.choice(len(allowed), p=chances / chances.sum()))]


def _plan_studies(n: int, seed: int, weights: Mapping[Label, float]) -> list[_StudyPlan]:
    """Patients, their studies and their findings, until ``n`` images are planned."""
    rng = np.random.default_rng([seed, 0])
    counts = dict.fromkeys(LABELS, 0)
    plans: list[_StudyPlan] = []
    planned = 0
    patient = 0
    while planned < n:
        patient += 1
        day = _FIRST_STUDY_DAY + datetime.timedelta(days=int(rng.integers(0, _STUDY_SPAN_DAYS)))
        age_days = int(rng.integers(35 * 365, 76 * 365))
        birth = day - datetime.timedelta(days=age_days)
        for study_in_patient in range(1, int(rng.integers(1, 4)) + 1):
            if planned >= n:
                break
            images = min(int(rng.integers(1, 5)), n - planned)
            label = _next_label(rng, counts, weights, images)
            counts[label] += images
            time = datetime.time(int(rng.integers(8, 18)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
            laterality = "L" if rng.random() < 0.5 else "R"
            plans.append(
                _StudyPlan(
                    len(plans) + 1,
                    patient,
                    birth,
                    day,
                    time,
                    study_in_patient,
                    label,
                    laterality,
                    planned + 1,
                    images,
                )
            )
            planned += images
            day += datetime.timedelta(days=int(rng.integers(90, 500)))
    return plans


def _write_study(out_dir: Path, study: _StudyPlan, seed: int, size: tuple[int, int]) -> list[DicomPhantom]:
    """The images of one study: one lesion (or none), seen from a slightly different place in each."""
    lesion = sample_lesion(study.label, np.random.default_rng([seed, 1, study.number]))
    identity = _study_identity(study, seed)
    folder = out_dir / str(identity["PatientID"]) / f"ST{study.study_in_patient:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for instance in range(1, study.images + 1):
        image_number = study.first_image + instance - 1
        rng = np.random.default_rng([seed, 2, image_number])
        view = lesion.seen_again(rng) if lesion is not None and instance > 1 else lesion
        phantom = render_phantom(view, rng, size)
        sop_uid = derived_uid("phantom-image", str(seed), str(image_number))
        dataset = _ultrasound_dataset(identity, study, instance, sop_uid, phantom)
        path = folder / f"IM{instance:02d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        records.append(
            DicomPhantom(
                path=path,
                label=study.label,
                patient_id=str(identity["PatientID"]),
                patient_name=str(identity["PatientName"]),
                study_instance_uid=str(identity["StudyInstanceUID"]),
                series_instance_uid=str(identity["SeriesInstanceUID"]),
                sop_instance_uid=sop_uid,
                accession_number=str(identity["AccessionNumber"]),
                study_date=str(identity["StudyDate"]),
                laterality=study.laterality,
            )
        )
    return records


def _study_identity(study: _StudyPlan, seed: int) -> dict[str, object]:
    """Patient, study and series attributes shared by every image of the study.

    Identifiers carry a digest of the seed, so phantom sets made with different seeds can be
    sent to one node without two different patients sharing an ID.
    """
    digest = hashlib.sha256(f"precedent-phantom-{seed}".encode()).hexdigest()[:6].upper()
    age = (study.date - study.birth_date).days // 365
    side = "LEFT" if study.laterality == "L" else "RIGHT"
    return {
        "PatientName": f"PHANTOM^{study.patient}",
        "PatientID": f"PH{digest}-{study.patient:05d}",
        "PatientBirthDate": study.birth_date.strftime("%Y%m%d"),
        "PatientSex": "F",
        "PatientAge": f"{age:03d}Y",
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": "synthetic phantom: no real patient",
        "StudyInstanceUID": derived_uid("phantom-study", str(seed), str(study.number)),
        "StudyDate": study.date.strftime("%Y%m%d"),
        "StudyTime": study.time.strftime("%H%M%S"),
        "StudyID": str(study.study_in_patient),
        "AccessionNumber": f"PH{digest}{study.number:06d}",
        "ReferringPhysicianName": "",
        "StudyDescription": "US BREAST",
        "SeriesInstanceUID": derived_uid("phantom-series", str(seed), str(study.number)),
        "SeriesNumber": 1,
        "SeriesDate": study.date.strftime("%Y%m%d"),
        "SeriesTime": study.time.strftime("%H%M%S"),
        "SeriesDescription": f"US BREAST {side}",
        "Modality": "US",
        "BodyPartExamined": "BREAST",
        "Manufacturer": MANUFACTURER,
        "ManufacturerModelName": "Precedent breast US phantom",
        "SoftwareVersions": "1",
    }


def _ultrasound_dataset(
    identity: Mapping[str, object], study: _StudyPlan, instance: int, sop_uid: str, phantom: Phantom
) -> Dataset:
    """An Ultrasound Image Storage data set: the image in a black frame, and its region."""
    frame, region = _framed(phantom)
    dataset = Dataset()
    for keyword, value in identity.items():
        setattr(dataset, keyword, value)
    content_time = datetime.datetime.combine(study.date, study.time) + datetime.timedelta(
        seconds=20 * instance
    )
    dataset.SOPClassUID = UltrasoundImageStorage
    dataset.SOPInstanceUID = sop_uid
    dataset.InstanceNumber = instance
    dataset.ContentDate = content_time.strftime("%Y%m%d")
    dataset.ContentTime = content_time.strftime("%H%M%S")
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "BREAST", "0001"]
    dataset.ImageLaterality = study.laterality
    dataset.PatientOrientation = ""
    dataset.ImageComments = SYNTHETIC_MARKER
    dataset.BurnedInAnnotation = "NO"
    dataset.LossyImageCompression = "00"
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = frame.shape
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.SequenceOfUltrasoundRegions = DicomSequence([_region(region, phantom.spacing_mm)])
    dataset.PixelData = frame.tobytes()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return dataset


def _framed(phantom: Phantom) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The image inside a black surround with text-free graphics, and its (top, left, bottom, right).

    The graphics (a depth scale in centimetres, a focus marker, a grey bar and a probe
    orientation mark) are what real scanners burn in around the image; they lie outside the
    ultrasound region, where the analysis does not look.
    """
    rows, columns = phantom.image.shape
    top, left, bottom, right = _FRAME_MARGINS
    right += (rows + top + bottom) * (columns + left + right) % 2  # Pixel Data of even length
    frame = np.zeros((rows + top + bottom, columns + left + right), dtype=np.uint8)
    frame[top : top + rows, left : left + columns] = phantom.image
    scale_x = left + columns + 8
    for depth_mm in range(0, int(rows * phantom.spacing_mm) + 1, 5):
        y = top + round(depth_mm / phantom.spacing_mm)
        frame[y, scale_x : scale_x + (8 if depth_mm % 10 == 0 else 4)] = _BURNED_IN
    focus_y = top + rows // 2
    triangle = np.array([[scale_x + 12, focus_y], [scale_x + 18, focus_y - 4], [scale_x + 18, focus_y + 4]])
    cv2.fillPoly(frame, [triangle.astype(np.int32)], _BURNED_IN)
    bar = np.linspace(255, 0, rows // 2).round().astype(np.uint8)
    frame[top : top + rows // 2, 16:24] = bar[:, None]
    frame[top - 14 : top - 8, left + 2 : left + 8] = _BURNED_IN
    return frame, (top, left, top + rows, left + columns)


def _region(box: tuple[int, int, int, int], spacing_mm: float) -> Dataset:
    """The Ultrasound Region item of the image: 2-D tissue, calibrated in centimetres."""
    top, left, bottom, right = box
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2-D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0 = left
    region.RegionLocationMinY0 = top
    region.RegionLocationMaxX1 = right - 1  # corners are inclusive
    region.RegionLocationMaxY1 = bottom - 1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = spacing_mm / 10.0
    region.PhysicalDeltaY = spacing_mm / 10.0
    region.ReferencePixelX0 = (right - left) // 2
    region.ReferencePixelY0 = 0
    region.ReferencePixelPhysicalValueX = 0.0
    region.ReferencePixelPhysicalValueY = 0.0
    region.TransducerFrequency = 12000  # kHz: a linear breast probe
    return region


def _write_manifest(out_dir: Path, records: Sequence[DicomPhantom]) -> None:
    """``labels.csv``: one row per image, paths relative to ``out_dir`` so the set can move."""
    with (out_dir / MANIFEST).open("w", newline="", encoding="utf-8") as manifest:
        writer = csv.writer(manifest, lineterminator="\n")
        writer.writerow(["path", "label", "patient_id", "study_instance_uid", "sop_instance_uid"])
        for record in records:
            writer.writerow(
                [
                    record.path.relative_to(out_dir).as_posix(),
                    record.label,
                    record.patient_id,
                    record.study_instance_uid,
                    record.sop_instance_uid,
                ]
            )


def _png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {pixels.shape}")
    return encoded.tobytes()
