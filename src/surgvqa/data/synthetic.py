"""Synthetic Kvasir-VQA look-alike: real schema, real questions and answer vocabularies, learnable pixels.

``make_synthetic(out_dir, images, seed, image_size)`` writes ``kvasir_vqa_synthetic.parquet`` with the columns
Hugging Face publishes for ``SimulaMet-HOST/Kvasir-VQA`` (``image`` as the ``Image`` feature's
``struct<bytes, path>`` storage, ``source``, ``question``, ``answer``, ``img_id``), one row per QA pair, and a
``README.txt``. Nothing is random outside one ``numpy`` Generator per image (seeded with ``(seed, index)``),
and images are PNG, so the same seed gives the same bytes; any image's scene can be rebuilt alone with
``make_scene(seed, index)``.

Every answer is carried by a flat-coloured, non-antialiased shape on a flat background, each object alone in its
3x3 grid cell (centred in it), with the exact palette RGB value at the centre pixel of every abnormality
(why: ``docs/benchmarks.md``, "Why the synthetic pixels are flat shapes").

Visual code (S = image side, s = S/3 = one grid cell; sizes scale with S):

===================================================== ========================================================
template                                              what in the pixels determines the answer
===================================================== ========================================================
What type of procedure ...                            flat background tone: colonoscopy rose (200,135,125),
                                                      gastroscopy mauve (160,100,110), capsule endoscopy
                                                      olive (180,150,80) + black outside a centred circle
Is there text?                                        white box with dark "text" lines in the top-left corner
                                                      (never on capsule images: the mask covers the corner)
Is there a green/black box artefact?                  green (0,200,0) or black box in the lower-left corner
                                                      (never on capsule images)
Are there any abnormalities ...                       shape of the abnormality objects: polyp = disc /
                                                      ellipse, ulcerative colitis = filled square,
                                                      oesophagitis = triangle, barretts = large diamond,
                                                      short-segment barretts = small diamond,
                                                      hemorrhoids = plus sign
Where in the image is the abnormality?                the grid cells holding abnormality objects
What color is the abnormality? ...                    fill colours of the abnormality objects (``PALETTE``,
                                                      exact value at each object's cell centre)
How many polyps are in the image?                     number of polyp discs/ellipses
What is the size of the polyp?                        radius of the largest polyp: <5mm 6 px, 5-10mm 10 px,
                                                      11-20mm 14 px, >20mm 18 px at S=112 (18 px still fits
                                                      a 37 px cell, so objects never touch); none = no polyp
What type of polyp is present?                        paris is = plain disc, paris ip = disc with a dark
                                                      (light on dark polyps) outline, paris iia = flat
                                                      ellipse (height 0.55 x width); set over all polyps
How many findings are present?                        polyps + distinct non-polyp abnormality shapes
Does this image contain any finding?                  yes iff any abnormality object is drawn
Is this finding easy to detect?                       not relevant = no abnormality; yes = some object is
                                                      large (polyp >= 11 mm, or any square / triangle /
                                                      large diamond / plus); no = only small polyps or
                                                      small diamonds
Have all polyps been removed?                         no = a polyp is drawn; yes = no polyp but a slate-blue
                                                      (70,90,170) "X" resection scar; not relevant = neither
Are there any instruments ... / How many instrumnets  silver (200,205,215) shapes: tube = long thick bar,
                                                      biopsy forceps = bar + open fork, polyp snare = shaft +
                                                      loop, metal clip = V, injection needle = thin diagonal
Where in the image is the instrument?                 cells holding instrument shapes
Are there any anatomical landmarks ...                z-line = horizontal band, ileum = vertical band,
                                                      cecum = ring, pylorus = hollow square
Where in the image is the anatomical landmark?        cells holding landmark shapes
What color is the anatomical landmark? ...            colours of the landmark shapes
===================================================== ========================================================

Deliberate noise, as in the real data: multi-label answers in shuffled order, joined by ``"; "`` or (10 %)
``";"``; ``lower-rigth`` for ``lower-right`` (2 % of answers naming it); ``>20`` for ``>20mm`` (10 %); size
answers listing every size bin present instead of the largest (5 % of images with several bins, like the real
``5-10mm;<5mm``); 0.5 % bad rows whose answer is ``nan`` or empty. ``Normal`` images carry only
``Does this image contain any finding?`` -> ``no``; other images 8-10 questions drawn from the templates that
apply (location / landmark-colour questions only when such an object exists), always including their source's
key templates.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from surgvqa.core.io import atomic_write_text

if TYPE_CHECKING:
    from surgvqa.core.config import Config

PARQUET_NAME = "kvasir_vqa_synthetic.parquet"

SOURCES = ("Ulcerative Colitis", "Polyps", "Esophagitis", "Instrument", "Normal")
SOURCE_WEIGHTS = (0.20, 0.30, 0.20, 0.20, 0.10)

# The 19 Kvasir-VQA templates, exact strings (typo "instrumnets" included), in the order of kvasir-vqa.md.
Q_TEXT = "Is there text?"
Q_EASY = "Is this finding easy to detect?"
Q_PROCEDURE = "What type of procedure is the image taken from?"
Q_REMOVED = "Have all polyps been removed?"
Q_BOX = "Is there a green/black box artefact?"
Q_N_INSTRUMENTS = "How many instrumnets are in the image?"
Q_N_FINDINGS = "How many findings are present?"
Q_POLYP_TYPE = "What type of polyp is present?"
Q_SIZE = "What is the size of the polyp?"
Q_INSTRUMENT_WHERE = "Where in the image is the instrument?"
Q_N_POLYPS = "How many polyps are in the image?"
Q_INSTRUMENTS = "Are there any instruments in the image? Check all that are present."
Q_ABNORMALITY_COLOR = "What color is the abnormality? If more than one separate with ;"
Q_ABNORMALITIES = "Are there any abnormalities in the image? Check all that are present."
Q_ABNORMALITY_WHERE = "Where in the image is the abnormality?"
Q_FINDING = "Does this image contain any finding?"
Q_LANDMARK_WHERE = "Where in the image is the anatomical landmark?"
Q_LANDMARKS = "Are there any anatomical landmarks in the image? Check all that are present."
Q_LANDMARK_COLOR = "What color is the anatomical landmark? If more than one separate with ;"

QUESTIONS = (
    Q_TEXT, Q_EASY, Q_PROCEDURE, Q_REMOVED, Q_BOX, Q_N_INSTRUMENTS, Q_N_FINDINGS, Q_POLYP_TYPE, Q_SIZE,
    Q_INSTRUMENT_WHERE, Q_N_POLYPS, Q_INSTRUMENTS, Q_ABNORMALITY_COLOR, Q_ABNORMALITIES, Q_ABNORMALITY_WHERE,
    Q_FINDING, Q_LANDMARK_WHERE, Q_LANDMARKS, Q_LANDMARK_COLOR,
)

GRID_CELLS = (
    "upper-left", "upper-center", "upper-right",
    "center-left", "center", "center-right",
    "lower-left", "lower-center", "lower-right",
)

# Kvasir colour vocabulary -> one clearly distinct RGB value each (none equals a background or the silver).
PALETTE = {
    "pink": (255, 130, 200),
    "red": (215, 25, 25),
    "white": (255, 255, 255),
    "yellow": (250, 225, 20),
    "flesh": (255, 210, 170),
    "brown": (115, 60, 20),
    "grey": (120, 120, 120),
    "green": (30, 150, 60),
    "blue": (30, 70, 230),
    "black": (0, 0, 0),
    "orange": (255, 140, 0),
    "purple": (130, 30, 170),
}
BACKGROUNDS = {
    "colonoscopy": (200, 135, 125),
    "gastroscopy": (160, 100, 110),
    "capsule endoscopy": (180, 150, 80),
}
SILVER = (200, 205, 215)
SCAR_BLUE = (70, 90, 170)
BOX_COLOURS = {"green": (0, 200, 0), "black": (0, 0, 0)}
TEXT_INK = (20, 20, 20)

SIZE_BINS = ("<5mm", "5-10mm", "11-20mm", ">20mm")
_SIZE_RADIUS_112 = {"<5mm": 6, "5-10mm": 10, "11-20mm": 14, ">20mm": 18}
POLYP_TYPES = ("paris is", "paris ip", "paris iia")
INSTRUMENTS = ("tube", "biopsy forceps", "polyp snare", "metal clip", "injection needle")
LANDMARKS = ("z-line", "cecum", "ileum", "pylorus")
# Non-polyp abnormalities, each drawn as its own shape (see module docstring).
PATCH_ABNORMALITIES = (
    "ulcerative colitis", "oesophagitis", "barretts", "short-segment barretts", "hemorrhoids",
)

_POLYP_COLOURS = {"pink": 25, "red": 20, "flesh": 12, "white": 8, "yellow": 5, "brown": 5, "orange": 5,
                  "purple": 4, "grey": 4, "green": 4, "blue": 4, "black": 4}
_PATCH_COLOURS = {
    "ulcerative colitis": {"red": 35, "white": 30, "yellow": 15, "pink": 10, "orange": 5, "brown": 5},
    "oesophagitis": {"red": 40, "white": 30, "pink": 15, "yellow": 10, "orange": 5},
    "barretts": {"pink": 30, "red": 30, "orange": 20, "flesh": 20},
    "short-segment barretts": {"pink": 30, "red": 30, "orange": 20, "flesh": 20},
    "hemorrhoids": {"purple": 40, "blue": 30, "red": 30},
}
_SIZE_WEIGHTS = {"<5mm": 15, "5-10mm": 35, "11-20mm": 30, ">20mm": 20}
_POLYP_TYPE_WEIGHTS = {"paris is": 50, "paris ip": 25, "paris iia": 25}
_INSTRUMENT_WEIGHTS = {"tube": 15, "biopsy forceps": 25, "polyp snare": 30, "metal clip": 15,
                       "injection needle": 15}
_LANDMARK_COLOURS = {"pink": 30, "white": 25, "red": 15, "flesh": 15, "yellow": 5, "orange": 5, "brown": 5}

# Rates of the deliberate noise (see module docstring).
P_NO_SPACE_SEPARATOR = 0.10
P_RIGTH_TYPO = 0.02
P_STRAY_20 = 0.10
P_ALL_SIZE_BINS = 0.05
P_BAD_ROW = 0.005


@dataclass(frozen=True)
class Polyp:
    cell: int
    colour: str
    size: str
    kind: str  # one of POLYP_TYPES


@dataclass(frozen=True)
class Patch:
    abnormality: str  # one of PATCH_ABNORMALITIES
    cell: int
    colour: str


@dataclass(frozen=True)
class Instrument:
    kind: str
    cell: int


@dataclass(frozen=True)
class Landmark:
    kind: str
    cell: int
    colour: str


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image; all answers are functions of it (``scene_answers``)."""

    img_id: str
    source: str
    procedure: str
    text: bool = False
    box: str | None = None  # "green" | "black" | None
    polyps: tuple[Polyp, ...] = ()
    patches: tuple[Patch, ...] = ()
    instruments: tuple[Instrument, ...] = ()
    landmarks: tuple[Landmark, ...] = ()
    scar_cell: int | None = None
    occupied: frozenset[int] = field(default=frozenset())

    @property
    def abnormality_cells(self) -> list[int]:
        return [p.cell for p in self.polyps] + [p.cell for p in self.patches]


# ----------------------------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _count(rng: np.random.Generator, probs: dict[int, float]) -> int:
    return int(_pick(rng, {str(k): v for k, v in probs.items()}))


def image_id(index: int) -> str:
    return f"synth_{index:05d}"


class _FreeCells:
    """The grid cells no object holds yet, in the order objects claim them; one object per cell."""

    def __init__(self, rng: np.random.Generator):
        self.free = list(rng.permutation(9))

    def claim(self, n: int) -> list[int]:
        got = [int(c) for c in self.free[:n]]
        del self.free[:n]
        return got

    def occupied(self) -> frozenset[int]:
        return frozenset(set(range(9)) - {int(c) for c in self.free})


def _sample_procedure(rng: np.random.Generator, source: str) -> str:
    return _pick(rng, {
        "Polyps": {"colonoscopy": 90, "gastroscopy": 5, "capsule endoscopy": 5},
        "Instrument": {"colonoscopy": 90, "gastroscopy": 10},
        "Ulcerative Colitis": {"colonoscopy": 95, "capsule endoscopy": 5},
        "Esophagitis": {"gastroscopy": 97, "capsule endoscopy": 3},
        "Normal": {"colonoscopy": 45, "gastroscopy": 45, "capsule endoscopy": 10},
    }[source])


def _sample_patch_group(rng: np.random.Generator, cells: _FreeCells, abnormality: str, n_cells: int) -> list[Patch]:
    """``n_cells`` patches of one abnormality in one or (30 % of groups over several cells) two colours."""
    claimed = cells.claim(n_cells)
    if not claimed:
        return []
    n_colours = 2 if (len(claimed) > 1 and rng.random() < 0.3) else 1
    colours: list[str] = []
    while len(colours) < n_colours:
        c = _pick(rng, _PATCH_COLOURS[abnormality])
        if c not in colours:
            colours.append(c)
    return [Patch(abnormality, cell, colours[i] if i < len(colours) else colours[int(rng.integers(len(colours)))])
            for i, cell in enumerate(claimed)]


def _sample_patches(rng: np.random.Generator, cells: _FreeCells, source: str) -> tuple[Patch, ...]:
    patches: list[Patch] = []
    if source == "Ulcerative Colitis":
        patches += _sample_patch_group(rng, cells, "ulcerative colitis",
                                       9 if rng.random() < 0.35 else int(rng.integers(2, 7)))
    elif source == "Esophagitis":
        patches += _sample_patch_group(rng, cells, "oesophagitis", int(rng.integers(1, 4)))
        if rng.random() < 0.10:
            patches += _sample_patch_group(rng, cells, "barretts", int(rng.integers(1, 3)))
        if rng.random() < 0.10:
            patches += _sample_patch_group(rng, cells, "short-segment barretts", 1)
    if source in ("Polyps", "Ulcerative Colitis") and rng.random() < 0.03:
        patches += _sample_patch_group(rng, cells, "hemorrhoids", 1)
    return tuple(patches)


def _sample_polyps(rng: np.random.Generator, cells: _FreeCells, source: str) -> tuple[Polyp, ...]:
    n_polyps = _count(rng, {
        "Polyps": {1: 65, 2: 20, 3: 8, 4: 4, 5: 2, 6: 1},
        "Instrument": {0: 60, 1: 30, 2: 10},
        "Ulcerative Colitis": {0: 90, 1: 10},
    }.get(source, {0: 1}))
    return tuple(
        Polyp(cell, _pick(rng, _POLYP_COLOURS), _pick(rng, _SIZE_WEIGHTS), _pick(rng, _POLYP_TYPE_WEIGHTS))
        for cell in cells.claim(n_polyps)
    )


def _sample_instruments(rng: np.random.Generator, cells: _FreeCells, source: str) -> tuple[Instrument, ...]:
    n_instruments = _count(rng, {
        "Instrument": {1: 70, 2: 25, 3: 5},
        "Polyps": {0: 85, 1: 15},
        "Esophagitis": {0: 95, 1: 5},
    }.get(source, {0: 1}))
    weights = {"Polyps": {"polyp snare": 1}, "Esophagitis": {"biopsy forceps": 1}}.get(
        source, _INSTRUMENT_WEIGHTS)
    return tuple(Instrument(_pick(rng, weights), cell) for cell in cells.claim(n_instruments))


def _sample_landmarks(rng: np.random.Generator, cells: _FreeCells, source: str,
                      procedure: str) -> tuple[Landmark, ...]:
    landmark_kinds = {"gastroscopy": ("z-line", "pylorus"), "colonoscopy": ("cecum", "ileum"),
                      "capsule endoscopy": LANDMARKS}[procedure]
    if source == "Normal":
        n_landmarks = 2 if rng.random() < 0.15 else 1
    else:
        p_landmark = {"Esophagitis": 0.6, "Ulcerative Colitis": 0.15, "Polyps": 0.05, "Instrument": 0.05}
        n_landmarks = int(rng.random() < p_landmark[source])
    kinds = ["z-line"] if source == "Esophagitis" and procedure == "gastroscopy" else list(landmark_kinds)
    return tuple(
        Landmark(kinds[int(rng.integers(len(kinds)))], cell, _pick(rng, _LANDMARK_COLOURS))
        for cell in cells.claim(n_landmarks)
    )


def _sample_scar_cell(rng: np.random.Generator, cells: _FreeCells, source: str, has_polyps: bool) -> int | None:
    """The cell of a resection scar, drawn only where no polyp is (it answers "all polyps removed: yes")."""
    p_scar = {"Instrument": 0.35, "Ulcerative Colitis": 0.05}.get(source, 0.0)
    if not has_polyps and rng.random() < p_scar:
        return (cells.claim(1) or [None])[0]
    return None


def _sample_overlays(rng: np.random.Generator, source: str, procedure: str) -> tuple[bool, str | None]:
    """Whether the text box is drawn, and the artefact box's colour (None: no box)."""
    overlays_allowed = procedure != "capsule endoscopy"  # the capsule mask hides the corners
    text = overlays_allowed and rng.random() < 0.4
    box = None
    if overlays_allowed and rng.random() < (0.15 if source == "Instrument" else 0.35):
        box = "green" if rng.random() < 0.6 else "black"
    return bool(text), box


def make_scene(seed: int, index: int) -> Scene:
    """The scene of image ``index`` for ``seed``; independent of every other image."""
    # One generator per image, drawn from in this order: reordering the steps changes every image.
    rng = np.random.default_rng([seed, index, 0])
    source = SOURCES[int(rng.choice(len(SOURCES), p=SOURCE_WEIGHTS))]
    procedure = _sample_procedure(rng, source)
    cells = _FreeCells(rng)
    patches = _sample_patches(rng, cells, source)
    polyps = _sample_polyps(rng, cells, source)
    instruments = _sample_instruments(rng, cells, source)
    landmarks = _sample_landmarks(rng, cells, source, procedure)
    scar_cell = _sample_scar_cell(rng, cells, source, has_polyps=bool(polyps))
    text, box = _sample_overlays(rng, source, procedure)
    return Scene(img_id=image_id(index), source=source, procedure=procedure, text=text, box=box,
                 polyps=polyps, patches=patches, instruments=instruments, landmarks=landmarks,
                 scar_cell=scar_cell, occupied=cells.occupied())


# ----------------------------------------------------------------------------------------------- drawing


def cell_centre(cell: int, image_size: int) -> tuple[int, int]:
    """Integer pixel (x, y) at the centre of grid cell ``cell`` (0 = upper-left, row-major)."""
    row, col = divmod(cell, 3)
    return int((col + 0.5) * image_size / 3), int((row + 0.5) * image_size / 3)


def polyp_radius(size: str, image_size: int) -> int:
    return max(2, round(_SIZE_RADIUS_112[size] * image_size / 112))


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_polyp(d: ImageDraw.ImageDraw, p: Polyp, size: int) -> None:
    cx, cy = cell_centre(p.cell, size)
    r = polyp_radius(p.size, size)
    fill = PALETTE[p.colour]
    if p.kind == "paris iia":  # flat: squashed ellipse, width still gives the size
        ry = max(2, round(r * 0.55))
        d.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=fill)
    elif p.kind == "paris ip":  # pedunculated: outlined disc
        rim = (40, 40, 40) if _luminance(fill) > 80 else (235, 235, 235)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=rim, width=max(1, round(r * 0.2)))
    else:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _draw_patch(d: ImageDraw.ImageDraw, p: Patch, size: int) -> None:
    cx, cy = cell_centre(p.cell, size)
    s = size / 3
    fill = PALETTE[p.colour]

    def k(f: float) -> int:
        return max(1, round(f * s))

    if p.abnormality == "ulcerative colitis":
        d.rectangle([cx - k(0.28), cy - k(0.28), cx + k(0.28), cy + k(0.28)], fill=fill)
    elif p.abnormality == "oesophagitis":
        d.polygon([(cx, cy - k(0.38)), (cx - k(0.36), cy + k(0.30)), (cx + k(0.36), cy + k(0.30))], fill=fill)
    elif p.abnormality in ("barretts", "short-segment barretts"):
        h = k(0.42) if p.abnormality == "barretts" else k(0.22)
        d.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif p.abnormality == "hemorrhoids":
        arm, t = k(0.38), k(0.12)
        d.rectangle([cx - arm, cy - t, cx + arm, cy + t], fill=fill)
        d.rectangle([cx - t, cy - arm, cx + t, cy + arm], fill=fill)
    else:  # pragma: no cover - PATCH_ABNORMALITIES is closed
        raise ValueError(p.abnormality)


def _draw_instrument(d: ImageDraw.ImageDraw, ins: Instrument, size: int) -> None:
    cx, cy = cell_centre(ins.cell, size)
    s = size / 3

    def k(f: float) -> int:
        return max(1, round(f * s))

    if ins.kind == "tube":
        d.rectangle([cx - k(0.45), cy - k(0.12), cx + k(0.45), cy + k(0.12)], fill=SILVER)
    elif ins.kind == "biopsy forceps":
        d.rectangle([cx - k(0.45), cy - k(0.06), cx + k(0.10), cy + k(0.06)], fill=SILVER)
        d.line([(cx + k(0.10), cy), (cx + k(0.42), cy - k(0.28))], fill=SILVER, width=k(0.08))
        d.line([(cx + k(0.10), cy), (cx + k(0.42), cy + k(0.28))], fill=SILVER, width=k(0.08))
    elif ins.kind == "polyp snare":
        d.line([(cx - k(0.45), cy), (cx - k(0.15), cy)], fill=SILVER, width=k(0.06))
        d.ellipse([cx - k(0.15), cy - k(0.28), cx + k(0.45), cy + k(0.28)], outline=SILVER, width=k(0.07))
    elif ins.kind == "metal clip":
        d.line([(cx - k(0.25), cy - k(0.30)), (cx, cy + k(0.28)), (cx + k(0.25), cy - k(0.30))],
               fill=SILVER, width=k(0.10))
    elif ins.kind == "injection needle":
        d.line([(cx - k(0.45), cy + k(0.30)), (cx + k(0.45), cy - k(0.30))], fill=SILVER, width=k(0.04))
    else:  # pragma: no cover
        raise ValueError(ins.kind)


def _draw_landmark(d: ImageDraw.ImageDraw, lm: Landmark, size: int) -> None:
    cx, cy = cell_centre(lm.cell, size)
    s = size / 3
    fill = PALETTE[lm.colour]

    def k(f: float) -> int:
        return max(1, round(f * s))

    if lm.kind == "z-line":
        d.rectangle([cx - k(0.46), cy - k(0.08), cx + k(0.46), cy + k(0.08)], fill=fill)
    elif lm.kind == "ileum":
        d.rectangle([cx - k(0.08), cy - k(0.46), cx + k(0.08), cy + k(0.46)], fill=fill)
    elif lm.kind == "cecum":
        d.ellipse([cx - k(0.36), cy - k(0.36), cx + k(0.36), cy + k(0.36)], outline=fill, width=k(0.09))
    elif lm.kind == "pylorus":
        d.rectangle([cx - k(0.34), cy - k(0.34), cx + k(0.34), cy + k(0.34)], outline=fill, width=k(0.09))
    else:  # pragma: no cover
        raise ValueError(lm.kind)


def render_scene(scene: Scene, image_size: int = 112) -> Image.Image:
    """Draw ``scene`` (no randomness here: the scene fixes every pixel)."""
    size = image_size
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.procedure])
    d = ImageDraw.Draw(img)
    for lm in scene.landmarks:
        _draw_landmark(d, lm, size)
    for p in scene.patches:
        _draw_patch(d, p, size)
    if scene.scar_cell is not None:
        cx, cy = cell_centre(scene.scar_cell, size)
        a, w = max(2, round(0.30 * size / 3)), max(1, round(0.08 * size / 3))
        d.line([(cx - a, cy - a), (cx + a, cy + a)], fill=SCAR_BLUE, width=w)
        d.line([(cx - a, cy + a), (cx + a, cy - a)], fill=SCAR_BLUE, width=w)
    for p in scene.polyps:
        _draw_polyp(d, p, size)
    for ins in scene.instruments:
        _draw_instrument(d, ins, size)
    # Overlays last, as they are burnt into real frames; kept small enough to leave every cell centre visible.
    if scene.text:
        w, h = round(0.30 * size), max(4, round(0.12 * size))
        d.rectangle([0, 0, w - 1, h - 1], fill=(255, 255, 255))
        line_h = max(1, h // 6)
        for i, frac in enumerate((0.8, 0.55)):
            y = round((i * 2 + 1) * h / 4) - line_h // 2
            d.rectangle([max(1, w // 12), y, round(frac * w), y + line_h - 1], fill=TEXT_INK)
    if scene.box is not None:
        b = max(3, round(0.15 * size))
        d.rectangle([0, size - b, b - 1, size - 1], fill=BOX_COLOURS[scene.box])
    if scene.procedure == "capsule endoscopy":
        mask = Image.new("L", (size, size), 255)
        r = 0.53 * size
        ImageDraw.Draw(mask).ellipse([size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r], fill=0)
        img.paste((0, 0, 0), (0, 0, size, size), mask)
    return img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- answers


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def scene_answers(scene: Scene) -> dict[str, list[str]]:
    """Canonical answer labels (before formatting noise) for every template that applies to ``scene``.

    Location and landmark-colour templates apply only when such an object exists; a ``Normal`` image gets only
    the finding question (as in Kvasir-VQA).
    """
    has_abnormality = bool(scene.polyps or scene.patches)
    if scene.source == "Normal":
        return {Q_FINDING: ["yes" if has_abnormality else "no"]}
    patch_kinds = _unique(p.abnormality for p in scene.patches)
    abnormalities = (["polyp"] if scene.polyps else []) + patch_kinds
    large = any(SIZE_BINS.index(p.size) >= 2 for p in scene.polyps) or any(
        k != "short-segment barretts" for k in patch_kinds)
    easy = ("yes" if large else "no") if has_abnormality else "not relevant"
    removed = "no" if scene.polyps else ("yes" if scene.scar_cell is not None else "not relevant")
    largest = max((p.size for p in scene.polyps), key=SIZE_BINS.index, default="none")
    answers = {
        Q_TEXT: ["yes" if scene.text else "no"],
        Q_EASY: [easy],
        Q_PROCEDURE: [scene.procedure],
        Q_REMOVED: [removed],
        Q_BOX: ["yes" if scene.box else "no"],
        Q_N_INSTRUMENTS: [str(len(scene.instruments))],
        Q_N_FINDINGS: [str(len(scene.polyps) + len(patch_kinds))],
        Q_POLYP_TYPE: _unique(p.kind for p in scene.polyps) or ["none"],
        Q_SIZE: [largest],
        Q_N_POLYPS: [str(len(scene.polyps))],
        Q_INSTRUMENTS: _unique(i.kind for i in scene.instruments) or ["none"],
        Q_ABNORMALITY_COLOR: _unique([p.colour for p in scene.polyps] + [p.colour for p in scene.patches])
        or ["none"],
        Q_ABNORMALITIES: abnormalities or ["none"],
        Q_FINDING: ["yes" if has_abnormality else "no"],
        Q_LANDMARKS: _unique(lm.kind for lm in scene.landmarks) or ["none"],
    }
    if scene.instruments:
        answers[Q_INSTRUMENT_WHERE] = _unique(GRID_CELLS[i.cell] for i in scene.instruments)
    if has_abnormality:
        answers[Q_ABNORMALITY_WHERE] = _unique(GRID_CELLS[c] for c in scene.abnormality_cells)
    if scene.landmarks:
        answers[Q_LANDMARK_WHERE] = _unique(GRID_CELLS[lm.cell] for lm in scene.landmarks)
        answers[Q_LANDMARK_COLOR] = _unique(lm.colour for lm in scene.landmarks)
    return answers


# Templates every image of a source is asked, before the random fill-up to 8-10 questions.
KEY_TEMPLATES = {
    "Polyps": (Q_ABNORMALITIES, Q_N_POLYPS, Q_SIZE, Q_ABNORMALITY_COLOR, Q_ABNORMALITY_WHERE, Q_POLYP_TYPE),
    "Instrument": (Q_INSTRUMENTS, Q_N_INSTRUMENTS, Q_INSTRUMENT_WHERE),
    "Ulcerative Colitis": (Q_ABNORMALITIES, Q_ABNORMALITY_WHERE, Q_ABNORMALITY_COLOR),
    "Esophagitis": (Q_ABNORMALITIES, Q_ABNORMALITY_WHERE, Q_ABNORMALITY_COLOR),
    "Normal": (Q_FINDING,),
}


def scene_qa(scene: Scene, seed: int, index: int) -> list[tuple[str, str]]:
    """The (question, answer string) rows of one image, formatting noise included."""
    rng = np.random.default_rng([seed, index, 1])
    answers = scene_answers(scene)
    chosen = [q for q in KEY_TEMPLATES[scene.source] if q in answers]
    if scene.source != "Normal":
        pool = [q for q in answers if q not in chosen]
        n = int(rng.choice([8, 9, 10], p=[0.3, 0.4, 0.3]))
        extra = rng.permutation(len(pool))[: max(0, n - len(chosen))]
        chosen += [pool[int(i)] for i in sorted(extra)]
    rows = []
    for q in sorted(chosen, key=QUESTIONS.index):
        labels = list(answers[q])
        if q == Q_SIZE and rng.random() < P_ALL_SIZE_BINS:
            labels = _unique(p.size for p in scene.polyps) or labels
        if q == Q_SIZE and labels == [">20mm"] and rng.random() < P_STRAY_20:
            labels = [">20"]
        if "lower-right" in labels and rng.random() < P_RIGTH_TYPO:
            labels = ["lower-rigth" if lab == "lower-right" else lab for lab in labels]
        labels = [labels[int(i)] for i in rng.permutation(len(labels))]
        answer = (";" if rng.random() < P_NO_SPACE_SEPARATOR else "; ").join(labels)
        if rng.random() < P_BAD_ROW:
            answer = "nan" if rng.random() < 0.6 else ""
        rows.append((q, answer))
    return rows


# ----------------------------------------------------------------------------------------------- writing

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [("image", IMAGE_TYPE), ("source", pa.string()), ("question", pa.string()), ("answer", pa.string()),
     ("img_id", pa.string())],
    # What `datasets` writes, so that `load_dataset("parquet", ...)` decodes `image` as an Image feature.
    metadata={"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"},
        **{c: {"dtype": "string", "_type": "Value"} for c in ("source", "question", "answer", "img_id")},
    }}})},
)


def synthetic_rows(images: int = 300, seed: int = 0, image_size: int = 112) -> Iterator[dict]:
    """Yield the dataset's rows (dicts with the parquet columns), image by image."""
    for index in range(images):
        yield from synthetic_rows_for(seed, index, image_size)


def synthetic_rows_for(seed: int, index: int, image_size: int = 112) -> list[dict]:
    """The rows of image ``index`` alone; its image struct is shared by all its rows, as in Kvasir-VQA."""
    scene = make_scene(seed, index)
    image = {"bytes": encode_png(render_scene(scene, image_size)), "path": f"{scene.img_id}.png"}
    return [{"image": image, "source": scene.source, "question": q, "answer": a, "img_id": scene.img_id}
            for q, a in scene_qa(scene, seed, index)]


def _table(rows: list[dict]) -> pa.Table:
    image = pa.StructArray.from_arrays(
        [pa.array([r["image"]["bytes"] for r in rows], pa.binary()),
         pa.array([r["image"]["path"] for r in rows], pa.string())],
        fields=list(IMAGE_TYPE),
    )
    strings = [pa.array([r[c] for r in rows], pa.string()) for c in SCHEMA.names[1:]]
    return pa.Table.from_arrays([image, *strings], schema=SCHEMA)


def make_synthetic(out_dir: str | Path, images: int = 300, seed: int = 0, image_size: int = 112) -> Path:
    """Write ``out_dir/kvasir_vqa_synthetic.parquet`` (+ README.txt) and return the parquet path."""
    if images < 1 or image_size < 24:
        raise ValueError(f"need images >= 1 and image_size >= 24, got {images=} {image_size=}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PARQUET_NAME
    tmp = out_dir / f".{PARQUET_NAME}.tmp-{os.getpid()}"
    n_rows, chunk = 0, []
    chunk_images = 1000  # one row group per 1000 images keeps memory flat for any N
    bar = tqdm(total=images, desc="synthetic images", unit="img", leave=False,
               disable=images < 2000 or not sys.stderr.isatty())
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for index in range(images):
                chunk.extend(synthetic_rows_for(seed, index, image_size))
                bar.update(1)
                if (index + 1) % chunk_images == 0 or index == images - 1:
                    writer.write_table(_table(chunk))
                    n_rows += len(chunk)
                    chunk = []
        os.replace(tmp, path)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
    atomic_write_text(
        out_dir / "README.txt",
        "Synthetic Kvasir-VQA look-alike written by surgvqa.data.synthetic.make_synthetic\n"
        f"images={images} seed={seed} image_size={image_size} rows={n_rows}\n"
        "Schema and questions as SimulaMet-HOST/Kvasir-VQA (image struct<bytes,path> PNG, source, question,\n"
        "answer, img_id); every answer is determined by flat shapes on a flat background. The visual code\n"
        "is documented in the module docstring of surgvqa.data.synthetic. Same seed -> same bytes.\n"
        "Not medical data: for pipeline tests and demos only.\n"
    )
    return path


def synthetic_source(config: Config) -> Path:
    """Build (once) and return the synthetic Kvasir-like parquet the default config trains on."""
    settings = config.data.synthetic
    folder = Path(config.cache_dir) / f"synthetic-{settings.images}img-seed{settings.seed}-{settings.image_size}px"
    marker = folder / ".complete"
    if not marker.exists():
        make_synthetic(folder, images=settings.images, seed=settings.seed, image_size=settings.image_size)
        atomic_write_text(marker, "ok\n")
    return next(folder.glob("*.parquet"))
