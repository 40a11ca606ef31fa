"""Prompt-adherence checker for the shapes world, by plain image analysis (no learned model).

Pipeline for one image (resized to 64x64 if needed):

1. background: the per-channel median of a 2-pixel frame, named by its nearest palette colour;
2. object pixels: colour distance from that median above half the distance from the background to its
   nearest other palette colour;
3. connected components (8-connectivity, min-label propagation with pointer jumping); components
   smaller than ``MIN_AREA`` pixels are stray blobs and dropped;
4. per component: colour = median of its purest quarter (farthest from the background), named by the
   nearest palette colour other than the background; coverage ``alpha`` per pixel = projection onto
   the background->object colour line (so anti-aliasing and blur keep their mass); then each shape is
   fitted by analysis-by-synthesis: extent from the soft area (circle e^2 pi/4, square e^2, triangle
   e^2/2), centre from the centroid (an upright triangle's centroid sits e/6 below its box centre),
   rendered with the dataset's own rasteriser, blurred by each of ``BLUR_SIGMAS`` (generated images are
   soft) and compared by L1 distance; the best fit gives shape,
   size (extent vs ``SIZE_THRESHOLD``), position (3x3 cell of the centre) and the centre used for
   relations (dominant axis of the offset between the two centres).

The single form judges the largest component, the relational form the two largest, assigned to the
prompt's objects by the better colour/shape match (ties resolved against the prompt).

Strict verdicts (``check(..., strict=True)``, the default) judge shape as a person would, on the soft
coverage map ``alpha`` of each object (sub-pixel, so anti-aliasing and mild blur keep the measures):

- every shape: the best template's relative L1 error <= ``MAX_FIT_ERROR`` (a blob fits no template);
- square: box fill = area / (widest row x tallest column) >= ``MIN_BOX_FILL`` (a "pillow" with concave
  sides or rounded corners fills less); straight sides: the widths of the central rows and the heights of
  the central columns vary by <= ``MAX_SIDE_BOW`` of the width; sharp corners: a blurred rectangle's
  coverage is separable (alpha(x, y) = a(x) b(y), so it equals outer(row sums, column sums) / area), and
  the corner patches must hold >= ``MIN_CORNER_MASS`` of that separable prediction;
- circle: radial deviation (std / mean of the radius measured from the mass in each of ``SECTORS``
  angular sectors about the centroid) <= ``MAX_RADIAL_DEVIATION``;
- triangle: mass at the bottom: the skewness of the vertical mass distribution <= ``MAX_TRIANGLE_SKEW``
  (an ideal upright triangle has -0.57, a square or circle 0); a point at the top: the width of the row
  above which 5% of the mass lies, over the width of the row that halves the mass, <= ``MAX_APEX_WIDTH``
  (ideal 0.32); straight sides: row widths deviate from the straight line from the apex to the base by
  <= ``MAX_TRIANGLE_BOW`` of the base (a notch or a stem bends the profile);
- flatness: the standard deviation of the pixels inside an object's fill (eroded ``FLAT_INSET`` px from
  its edge, beyond the reach of an edge blurred by up to about 1 px) and in the background
  (``FLAT_INSET`` px away from every object; stray specks count), the largest over ``TEXTURE_TILE`` px
  tiles, <= ``MAX_TEXTURE`` (0-255 scale);
- count: exactly as many objects (components of at least ``MIN_AREA`` px) as the prompt names.

The thresholds are calibrated on the world's own rendered images, clean, blurred (sigma <= 0.7 px) and
with noise (std 4), which all pass (tests/evaluation/test_shapes_checker.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image

from latentdiffusion.training.shapes import (
    AREA_FRACTIONS,
    CENTROID_DROPS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    ShapeSpec,
    coverage,
    parse_prompt,
    position_of,
    relation_holds,
    size_of,
)

BORDER = 2  # px of frame sampled for the background
MIN_AREA = 20  # px below which a component is a stray blob, not an object (smallest object: ~70 px)
PURE_QUANTILE = 0.75  # a component's colour is the median of its pixels beyond this distance quantile
GROW = 2  # px around a component whose coverage still counts (blur spreads edges outwards)
BLUR_SIGMAS = (0.0, 0.5, 1.0, 1.5)  # px; templates are also compared blurred, as generated images are soft
# Strict criteria (see the module docstring); calibrated in tests/evaluation/test_shapes_checker.py.
MAX_FIT_ERROR = 0.22
MIN_BOX_FILL = 0.95
MAX_SIDE_BOW = 0.12
MIN_CORNER_MASS = 0.95
CORNER_FRACTION = 0.25  # corner patches are this fraction of the box side
SECTORS = 16
MAX_RADIAL_DEVIATION = 0.06
MAX_TRIANGLE_SKEW = -0.35
MAX_APEX_WIDTH = 0.45
MAX_TRIANGLE_BOW = 0.07
FLAT_INSET = 3
MAX_TEXTURE = 8.0
TEXTURE_TILE = 8  # px; texture is the largest std over tiles of this side
UPSAMPLE = 4  # sub-pixels per pixel side when measuring sectors and corners
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Detection:
    """One object found in an image; ``shape``, ``centre`` and ``extent`` are the best-fitting template's."""

    colour: str
    shape: str
    centre: tuple[float, float]
    extent: float
    area: float  # coverage-weighted pixel count
    fit_error: float  # L1 distance to the best template, relative to ``area``
    rgb: tuple[float, float, float] | None = None  # the measured object colour (median of its pure pixels)
    defects: tuple[str, ...] = ()  # strict shape criteria the object fails (e.g. "box fill", "corners")
    texture: float = 0.0  # std (0-255) of the pixels inside its fill, ``FLAT_INSET`` px from the edge
    measures: Mapping[str, float] | None = field(default=None, compare=False)  # strict measures of ``shape``

    @property
    def size(self) -> str:
        return size_of(self.extent)

    @property
    def position(self) -> str:
        return position_of(self.centre)


# ---------------------------------------------------------------------------------------- primitives


def _nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        distances[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distances))]


def name_colour(
    rgb: Sequence[float], palette: Mapping[str, tuple[int, int, int]], exclude: str | None = None
) -> str:
    """The name of the ``palette`` colour nearest to ``rgb`` (other than ``exclude``): judges a measured
    ``Detection.rgb`` against colours beyond the world's own (a colour taught by textual inversion)."""
    names = [name for name in palette if name != exclude]
    distances = [float(np.linalg.norm(np.subtract(palette[name], rgb))) for name in names]
    return names[int(np.argmin(distances))]


def _neighbours(array: np.ndarray, fill: float | int | bool) -> list[np.ndarray]:
    """The 8 neighbour views of a 2-D array (``fill`` beyond the edge)."""
    padded = np.pad(array, 1, constant_values=fill)
    h, w = array.shape
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    return [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in steps]


def label_components(mask: np.ndarray) -> np.ndarray:
    """Connected components (8-connectivity) of a boolean mask: labels 0..n-1 by first pixel, -1 elsewhere.

    Every pixel starts with its own flat index and repeatedly takes the minimum over its neighbours;
    pointer jumping (label <- label of the pixel it names) makes this converge in few rounds.
    """
    sentinel = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), sentinel)
    while True:
        smallest = np.minimum.reduce([labels, *_neighbours(labels, sentinel)])
        flat = np.append(smallest.ravel(), sentinel)
        jumped = np.where(mask, flat[smallest], sentinel)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(mask.shape)
    return np.where(mask, dense, -1) if roots[-1] == sentinel else dense


def _dilate(mask: np.ndarray) -> np.ndarray:
    return mask | np.logical_or.reduce(_neighbours(mask, False))


# ------------------------------------------------------------------------------------------ analysis


def estimate_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The background's palette name and measured RGB (median over a ``BORDER``-pixel frame)."""
    b = BORDER
    sides = (pixels[:b], pixels[-b:], pixels[b:-b, :b], pixels[b:-b, -b:])
    frame = np.concatenate([side.reshape(-1, 3) for side in sides])
    rgb = np.median(frame, axis=0)
    return _nearest_colour(rgb), rgb


def _object_threshold(background: str, palette: Mapping[str, tuple[int, int, int]] = COLOURS) -> float:
    """Half the distance from the background to its nearest other colour of ``palette`` (the world's, or
    one with colours added, e.g. a colour taught by textual inversion)."""
    colours = np.array([rgb for name, rgb in palette.items() if name != background], dtype=np.float32)
    distances = np.linalg.norm(colours - np.array(COLOURS[background], dtype=np.float32), axis=1)
    return 0.5 * float(distances.min())


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` finds: the background, its texture (std, 0-255) and the objects, largest first."""

    background: str
    background_texture: float
    detections: list[Detection]


def detect(
    image: Image.Image, palette: Mapping[str, tuple[int, int, int]] = COLOURS
) -> tuple[str, list[Detection]]:
    """The background colour name and the objects in ``image``, largest first (``palette``: as
    ``analyse``)."""
    found = analyse(image, palette)
    return found.background, found.detections


def analyse(image: Image.Image, palette: Mapping[str, tuple[int, int, int]] = COLOURS) -> Analysis:
    """The background, its flatness and the objects in ``image`` (largest first). An object is what
    differs from the background by more than half the distance to the background's nearest other colour
    of ``palette``: the world's colours, or more where a judge names more (an object in a colour near
    the background's is found only when the palette holds that colour)."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    background, background_rgb = estimate_background(pixels)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    labels = label_components(distance > _object_threshold(background, palette))
    components = [labels == k for k in range(labels.max() + 1)]
    objects = labels >= 0
    detections = [
        _measure(pixels, distance, c, objects & ~c, background, background_rgb)
        for c in components
        if c.sum() >= MIN_AREA
    ]
    # Stray specks (components below MIN_AREA) are not objects: they count against a flat background.
    near_objects = np.zeros_like(objects)
    for component in components:
        if component.sum() >= MIN_AREA:
            near_objects |= component
    for _ in range(FLAT_INSET):
        near_objects = _dilate(near_objects)
    texture = _texture(pixels, ~near_objects)
    return Analysis(background, texture, sorted(detections, key=lambda d: d.area, reverse=True))


def _texture(pixels: np.ndarray, region: np.ndarray) -> float:
    """How far ``pixels`` inside ``region`` are from flat: the standard deviation of the pixels in each
    ``TEXTURE_TILE`` px tile holding at least 16 pixels of ``region`` (averaged over channels), largest
    over the tiles; 0 when no tile does. Local, so a textured patch is not diluted by a flat remainder."""
    h, w = region.shape
    side, stds = TEXTURE_TILE, [0.0]
    for top in range(0, h, side // 2):
        for left in range(0, w, side // 2):
            tile = region[top : top + side, left : left + side]
            if tile.sum() >= 16:
                values = pixels[top : top + side, left : left + side][tile]
                stds.append(float(values.std(axis=0).mean()))
    return max(stds)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = mask & np.logical_and.reduce(_neighbours(mask, False))
    return mask


def _measure(
    pixels: np.ndarray,
    distance: np.ndarray,
    component: np.ndarray,
    others: np.ndarray,
    background: str,
    background_rgb: np.ndarray,
) -> Detection:
    pure = component & (distance >= np.quantile(distance[component], PURE_QUANTILE))
    rgb = np.median(pixels[pure], axis=0)
    region = component
    for _ in range(GROW):
        region = _dilate(region)
    alpha = _coverage(pixels, background_rgb, rgb) * (region & ~others)
    area = float(alpha.sum())
    fits = [_fit(shape, alpha, area, ~others) for shape in SHAPES]
    error, shape, centre, extent = min(fits)
    colour = _nearest_colour(rgb, exclude=background)
    measured = (float(rgb[0]), float(rgb[1]), float(rgb[2]))
    fit_error = error / max(area, 1e-6)
    measures = {
        name: float(value) for name, value in {"fit error": fit_error, **SHAPE_MEASURES[shape](alpha)}.items()
    }
    defects = tuple(name for name, value in measures.items() if not _passes(name, value))
    texture = _texture(pixels, _erode(component, FLAT_INSET))
    return Detection(colour, shape, centre, extent, area, fit_error, measured, defects, texture, measures)


def _coverage(pixels: np.ndarray, background_rgb: np.ndarray, object_rgb: np.ndarray) -> np.ndarray:
    """Per-pixel fraction of object colour, assuming pixel = alpha * object + (1 - alpha) * background."""
    direction = object_rgb - background_rgb
    alpha = (pixels - background_rgb) @ direction / max(float(direction @ direction), 1e-6)
    return np.clip(alpha, 0.0, 1.0)


def _fit(
    shape: str, alpha: np.ndarray, area: float, window: np.ndarray
) -> tuple[float, str, tuple[float, float], float]:
    """(L1 error, shape, centre, extent) of the ``shape`` template with ``alpha``'s area and centroid."""
    extent = math.sqrt(area / AREA_FRACTIONS[shape])
    ys, xs = np.indices(alpha.shape) + 0.5  # pixel centres
    mass = max(area, 1e-6)
    x, y = float((alpha * xs).sum() / mass), float((alpha * ys).sum() / mass)
    centre = (x, y - CENTROID_DROPS[shape] * extent)
    template = coverage(ShapeSpec("white", shape, centre, extent))
    error = min(np.abs(alpha - _blur(template, sigma))[window].sum() for sigma in BLUR_SIGMAS)
    return float(error), shape, centre, extent


# ------------------------------------------------------------------------------------ strict measures


def _moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """Total mass and centroid (x, y) of a coverage map, in pixel coordinates (pixel centres at +0.5)."""
    ys, xs = np.indices(alpha.shape) + 0.5
    mass = max(float(alpha.sum()), 1e-6)
    return mass, float((alpha * xs).sum() / mass), float((alpha * ys).sum() / mass)


def _central(profile: np.ndarray, centre: float, half_span: float) -> np.ndarray:
    """The entries of a per-row (or per-column) profile whose pixel centre lies within ``half_span`` of
    ``centre``."""
    positions = np.arange(profile.size) + 0.5
    return profile[np.abs(positions - centre) <= half_span]


def _square_measures(alpha: np.ndarray) -> dict[str, float]:
    mass, cx, cy = _moments(alpha)
    rows, columns = alpha.sum(axis=1), alpha.sum(axis=0)
    width, height = np.sort(rows)[-2:].mean(), np.sort(columns)[-2:].mean()
    middle_rows = _central(rows, cy, 0.3 * height)
    middle_columns = _central(columns, cx, 0.3 * width)
    bow = max(_spread(middle_rows) / width, _spread(middle_columns) / height)
    separable = np.outer(rows, columns) / mass
    fine, model = _upsample(alpha), _upsample(separable)
    ys, xs = (np.indices(fine.shape) + 0.5) / UPSAMPLE
    corner_x, corner_y = CORNER_FRACTION * width, CORNER_FRACTION * height
    ratios = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            inside_x = (sx * (xs - cx) >= width / 2 - corner_x) & (sx * (xs - cx) <= width / 2 + 2)
            inside_y = (sy * (ys - cy) >= height / 2 - corner_y) & (sy * (ys - cy) <= height / 2 + 2)
            patch = inside_x & inside_y
            ratios.append(fine[patch].sum() / max(model[patch].sum(), 1e-6))
    return {"box fill": mass / (width * height), "side bow": float(bow), "corners": float(min(ratios))}


def _spread(values: np.ndarray) -> float:
    return float(values.max() - values.min()) if values.size else 0.0


def _circle_measures(alpha: np.ndarray) -> dict[str, float]:
    _, cx, cy = _moments(alpha)
    fine = _upsample(alpha)
    ys, xs = (np.indices(fine.shape) + 0.5) / UPSAMPLE
    angles = np.arctan2(ys - cy, xs - cx)
    sector = np.minimum(((angles + math.pi) / (2 * math.pi) * SECTORS).astype(int), SECTORS - 1)
    masses = np.bincount(sector.ravel(), weights=fine.ravel(), minlength=SECTORS) / UPSAMPLE**2
    radii = np.sqrt(2 * masses / (2 * math.pi / SECTORS))  # a sector of angle t and radius r holds t r^2 / 2
    return {"radial deviation": float(radii.std() / max(radii.mean(), 1e-6))}


def _triangle_measures(alpha: np.ndarray) -> dict[str, float]:
    mass, _, cy = _moments(alpha)
    rows = alpha.sum(axis=1)
    ys = np.arange(rows.size) + 0.5
    variance = float((rows * (ys - cy) ** 2).sum() / mass)
    skew = float((rows * (ys - cy) ** 3).sum() / mass) / max(variance, 1e-6) ** 1.5
    # An upright triangle of height h has its centroid 2h/3 below the apex and variance h^2 / 18.
    height = math.sqrt(18 * variance)
    apex = cy - 2 * height / 3
    base = 2 * mass / max(height, 1e-6)
    # Its mass above depth s*h is s^2: the rows holding 5% and 50% of the mass lie at s = 0.22 and 0.71,
    # where the widths are in ratio 0.32 (a flat top or a stem on the apex makes the upper row wider).
    upper, middle = (rows[_quantile_row(rows, q)] for q in (0.05, 0.5))
    apex_width = float(upper / max(middle, 1e-6))
    central = np.abs(ys - (apex + height / 2)) <= 0.3 * height
    line = base * (ys - apex) / max(height, 1e-6)  # width grows linearly from the apex to the base
    bow = float(np.abs(rows - line)[central].max(initial=0.0) / max(base, 1e-6))
    return {"skew": skew, "apex width": apex_width, "triangle bow": bow}


def _quantile_row(profile: np.ndarray, q: float) -> int:
    """The index of the row (or column) of ``profile`` where its cumulative mass reaches ``q``."""
    cumulative = np.cumsum(profile) / max(float(profile.sum()), 1e-6)
    return int(min(np.searchsorted(cumulative, q), profile.size - 1))


SHAPE_MEASURES = {"square": _square_measures, "circle": _circle_measures, "triangle": _triangle_measures}
_LIMITS = {  # measure -> (lowest, highest) accepted value
    "fit error": (-math.inf, MAX_FIT_ERROR),
    "box fill": (MIN_BOX_FILL, math.inf),
    "side bow": (-math.inf, MAX_SIDE_BOW),
    "corners": (MIN_CORNER_MASS, math.inf),
    "radial deviation": (-math.inf, MAX_RADIAL_DEVIATION),
    "skew": (-math.inf, MAX_TRIANGLE_SKEW),
    "apex width": (-math.inf, MAX_APEX_WIDTH),
    "triangle bow": (-math.inf, MAX_TRIANGLE_BOW),
}


def _passes(measure: str, value: float) -> bool:
    lowest, highest = _LIMITS[measure]
    return lowest <= value <= highest


def _upsample(array: np.ndarray) -> np.ndarray:
    """Each pixel split into ``UPSAMPLE`` x ``UPSAMPLE`` sub-pixels of the same value."""
    return np.repeat(np.repeat(array, UPSAMPLE, axis=0), UPSAMPLE, axis=1)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with zero padding (image is a coverage map, zero beyond the canvas)."""
    if sigma == 0:
        return image
    rows, columns = _gaussian_matrix(image.shape[0], sigma), _gaussian_matrix(image.shape[1], sigma)
    return rows @ image @ columns.T


@lru_cache(maxsize=16)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """The n x n matrix that convolves a length-n signal with a normalised Gaussian of std ``sigma``."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    radius = math.ceil(3 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= radius)
    return (weights / taps.sum()).astype(np.float32)


# ------------------------------------------------------------------------------------------- checking


def check(image: Image.Image, prompt: str, strict: bool = True) -> dict[str, bool]:
    """Whether ``image`` shows each attribute ``prompt`` states, plus "all" (every judged one right).

    Keys: "background", "colour", "shape" and, when stated, "size", "position" (single form) or
    "relation" (relational form, where "colour"/"shape" mean both objects right). ``strict`` (the
    default) also requires each shape to pass its shape criteria (module docstring) and adds "flat" (the
    fills and the background are flat) and "count" (as many objects as the prompt names);
    ``strict=False`` is the earlier, lenient verdict (best-fitting template only). Raises ValueError for
    prompts outside the shapes-world grammar.
    """
    spec = parse_prompt(prompt)
    found = analyse(image)
    detections = found.detections
    if not strict:
        detections = [replace(d, defects=()) for d in detections]
    result = {"background": found.background == spec.background}
    if spec.relation is None:
        result |= _check_single(spec.objects[0], detections[0] if detections else None)
    else:
        result |= _check_relational(spec, detections[:2])
    if strict:
        judged = detections[: len(spec.objects)]
        textures = [found.background_texture, *(d.texture for d in judged)]
        result["flat"] = len(judged) == len(spec.objects) and max(textures) <= MAX_TEXTURE
        result["count"] = len(detections) == len(spec.objects)
    result["all"] = all(result.values())
    return result


def _shape_right(found: Detection, shape: str) -> bool:
    return found.shape == shape and not found.defects


def _check_single(obj: ObjectSpec, found: Detection | None) -> dict[str, bool]:
    stated = {"colour": obj.colour, "size": obj.size, "position": obj.position}
    result = {
        key: found is not None and getattr(found, key) == value for key, value in stated.items() if value
    }
    return {
        "colour": result["colour"],
        "shape": found is not None and _shape_right(found, obj.shape),
    } | result


def _check_relational(spec: PromptSpec, found: list[Detection]) -> dict[str, bool]:
    if len(found) < 2:
        return {"colour": False, "shape": False, "relation": False}
    candidates = [_judge_pair(spec, first, second) for first, second in itertools.permutations(found)]
    # The better-matching assignment wins; on a tie, the one that judges the prompt less favourably.
    _, _, result = max(candidates, key=lambda c: (c[0], c[1]))
    return result


def _judge_pair(spec: PromptSpec, first: Detection, second: Detection) -> tuple[int, int, dict[str, bool]]:
    """(attribute matches, -verdicts passed, verdicts) for assigning ``first``/``second`` to the prompt."""
    pair = (first, second)
    colours = [o.colour == d.colour for o, d in zip(spec.objects, pair, strict=True)]
    shapes = [o.shape == d.shape for o, d in zip(spec.objects, pair, strict=True)]
    assert spec.relation is not None
    result = {
        "colour": all(colours),
        "shape": all(_shape_right(d, o.shape) for o, d in zip(spec.objects, pair, strict=True)),
        "relation": relation_holds(first.centre, second.centre, spec.relation),
    }
    return sum(colours) + sum(shapes), -sum(result.values()), result


def summarise(results: list[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per attribute over the results that state it; "all" is whole-prompt accuracy."""
    keys = sorted({key for result in results for key in result}, key=lambda k: (k == "all", k))
    return {key: float(np.mean([r[key] for r in results if key in r])) for key in keys}
