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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def _object_threshold(background: str) -> float:
    """Half the distance from the background to its nearest other palette colour."""
    distances = np.linalg.norm(_PALETTE - np.array(COLOURS[background], dtype=np.float32), axis=1)
    return 0.5 * float(np.sort(distances)[1])


def detect(image: Image.Image) -> tuple[str, list[Detection]]:
    """The background colour name and the objects in ``image``, largest first."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    background, background_rgb = estimate_background(pixels)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    labels = label_components(distance > _object_threshold(background))
    components = [labels == k for k in range(labels.max() + 1)]
    objects = labels >= 0
    detections = [
        _measure(pixels, distance, c, objects & ~c, background, background_rgb)
        for c in components
        if c.sum() >= MIN_AREA
    ]
    return background, sorted(detections, key=lambda d: d.area, reverse=True)


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
    return Detection(colour, shape, centre, extent, area, error / max(area, 1e-6), measured)


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


def check(image: Image.Image, prompt: str) -> dict[str, bool]:
    """Whether ``image`` shows each attribute ``prompt`` states, plus "all" (every stated one right).

    Keys: "background", "colour", "shape" and, when stated, "size", "position" (single form) or
    "relation" (relational form, where "colour"/"shape" mean both objects right). Raises ValueError
    for prompts outside the shapes-world grammar.
    """
    spec = parse_prompt(prompt)
    background, detections = detect(image)
    result = {"background": background == spec.background}
    if spec.relation is None:
        result |= _check_single(spec.objects[0], detections[0] if detections else None)
    else:
        result |= _check_relational(spec, detections[:2])
    result["all"] = all(result.values())
    return result


def _check_single(obj: ObjectSpec, found: Detection | None) -> dict[str, bool]:
    stated = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": obj.position}
    return {key: found is not None and getattr(found, key) == value for key, value in stated.items() if value}


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
        "shape": all(shapes),
        "relation": relation_holds(first.centre, second.centre, spec.relation),
    }
    return sum(colours) + sum(shapes), -sum(result.values()), result


def summarise(results: list[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per attribute over the results that state it; "all" is whole-prompt accuracy."""
    keys = sorted({key for result in results for key in result}, key=lambda k: (k == "all", k))
    return {key: float(np.mean([r[key] for r in results if key in r])) for key in keys}
