"""The procedural "shapes world": captioned 64x64 images of flat shapes, for training and evaluation.

The shipped default model is a small latent diffusion model (Rombach et al. 2022) trained on this world;
its prompt adherence is measured by :mod:`latentdiffusion.evaluation.shapes_checker`, which imports the
vocabulary below. Captions follow two templates:

- single: ``a [small|large] <colour> <shape> [in the <position>] on a <colour> background``
- relational: ``a <colour> <shape> <left of|right of|above|below> a <colour> <shape> on a <colour>
  background``

Attributes a caption leaves out are drawn at random in the image. Geometry (in pixels of the 64x64 canvas):

- every object is ``extent`` pixels across (bounding box ``extent`` x ``extent``); small: 12-16,
  large: 27-31; the object's centre is its bounding-box centre (also for triangles);
- a single object's centre lies in its 3x3 grid cell at least ``CELL_MARGIN`` from the cell's borders;
- every object keeps ``EDGE_MARGIN`` from the canvas edge;
- relational objects are both small; along the relation's axis their centres are at least
  ``(extent1 + extent2) / 2 + RELATION_GAP`` apart (so they never overlap), and the offset across the
  axis is at most ``RELATION_SLOPE`` times the offset along it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 3  # positions are the cells of a GRID x GRID split of the canvas

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = (  # row-major over the grid: index = row * GRID + column
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
RELATIONS = ("left of", "right of", "above", "below")
FORMS = ("single", "relational")

# Shape geometry in units of the extent e: area / e**2, and how far the centroid sits below the box centre.
AREA_FRACTIONS: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
CENTROID_DROPS: dict[str, float] = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}
SIZE_EXTENTS: dict[str, tuple[float, float]] = {"small": (12.0, 16.0), "large": (27.0, 31.0)}
SIZE_THRESHOLD = (SIZE_EXTENTS["small"][1] + SIZE_EXTENTS["large"][0]) / 2  # px; decides small vs large
RELATIONAL_SIZE = "small"  # two large objects would not fit side by side with a clear gap
EDGE_MARGIN = 2.0  # px between any object and the canvas edge (keeps the border background-only)
CELL_MARGIN = 2.5  # px between a single object's centre and the borders of its grid cell
RELATION_GAP = 6.0  # px of clear space between the two objects along the relation's axis
RELATION_SLOPE = 0.5  # |offset across the relation's axis| <= RELATION_SLOPE * |offset along it|
SUPERSAMPLE = 4  # render at 4x and box-downsample: exact area anti-aliasing
CAPTION_KEEP_PROBABILITY = 0.5  # chance that caption() states an optional attribute

SINGLE_TEMPLATE = "a [small|large] <colour> <shape> [in the <position>] on a <colour> background"
RELATIONAL_TEMPLATE = (
    "a <colour> <shape> <left of|right of|above|below> a <colour> <shape> on a <colour> background"
)


# --------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeSpec:
    """One placed object: ``centre`` is (x, y) in pixels, ``extent`` its bounding-box side in pixels."""

    colour: str
    shape: str
    centre: tuple[float, float]
    extent: float

    @property
    def size(self) -> str:
        return size_of(self.extent)

    @property
    def position(self) -> str:
        return position_of(self.centre)


@dataclass(frozen=True)
class Scene:
    """A full scene: one object (single form) or two related ones (relational form)."""

    objects: tuple[ShapeSpec, ...]
    background: str
    relation: str | None = None  # relational form: objects[0] <relation> objects[1]

    @property
    def form(self) -> str:
        return "single" if self.relation is None else "relational"


@dataclass(frozen=True)
class ObjectSpec:
    """The attributes a prompt states about one object; None means "not stated"."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """The attributes a prompt states (the parse of a caption)."""

    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str | None = None

    @property
    def form(self) -> str:
        return "single" if self.relation is None else "relational"


def grid_cell(coordinate: float) -> int:
    """Index (0..GRID-1) of the grid row/column of the 64x64 canvas that contains ``coordinate``."""
    return min(GRID - 1, max(0, math.floor(coordinate * GRID / IMAGE_SIZE)))


def position_of(centre: tuple[float, float]) -> str:
    """The position word of a centre (x, y) in pixels of the 64x64 canvas."""
    return POSITIONS[grid_cell(centre[1]) * GRID + grid_cell(centre[0])]


def size_of(extent: float) -> str:
    """The size word of an object ``extent`` pixels across on the 64x64 canvas."""
    return "large" if extent > SIZE_THRESHOLD else "small"


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    """Whether centre ``first`` is <relation> centre ``second``: the dominant axis decides (y grows down)."""
    dx, dy = first[0] - second[0], first[1] - second[1]
    horizontal = abs(dx) > abs(dy)
    return {
        "left of": horizontal and dx < 0,
        "right of": horizontal and dx > 0,
        "above": not horizontal and dy < 0,
        "below": not horizontal and dy > 0,
    }[relation]


# ------------------------------------------------------------------------------------------- captions


def describe(scene: Scene) -> PromptSpec:
    """Every attribute of ``scene`` the grammar can state (relational captions state no size or position)."""
    if scene.relation is None:
        objects = tuple(ObjectSpec(o.colour, o.shape, o.size, o.position) for o in scene.objects)
    else:
        objects = tuple(ObjectSpec(o.colour, o.shape) for o in scene.objects)
    return PromptSpec(objects, scene.background, scene.relation)


def format_prompt(spec: PromptSpec) -> str:
    """The caption text of ``spec`` (inverse of :func:`parse_prompt`)."""
    background = f"on a {spec.background} background"
    if spec.relation is not None:
        first, second = spec.objects
        return f"a {first.colour} {first.shape} {spec.relation} a {second.colour} {second.shape} {background}"
    (obj,) = spec.objects
    words = ["a", obj.size, obj.colour, obj.shape, obj.position and f"in the {obj.position}", background]
    return " ".join(word for word in words if word)


def caption(scene: Scene, rng: np.random.Generator | int) -> str:
    """A caption of ``scene``; in the single form size and position are each stated with probability 1/2."""
    rng = np.random.default_rng(rng)
    spec = describe(scene)
    if spec.relation is None:
        (obj,) = spec.objects
        keep_size, keep_position = rng.random(2) < CAPTION_KEEP_PROBABILITY
        obj = replace(
            obj, size=obj.size if keep_size else None, position=obj.position if keep_position else None
        )
        spec = replace(spec, objects=(obj,))
    return format_prompt(spec)


def _alternatives(words: tuple[str, ...]) -> str:
    # Longest first so that "top left" wins over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOUR, _SHAPE = f"({_alternatives(tuple(COLOURS))})", f"({_alternatives(SHAPES)})"
_BACKGROUND = f"on a {_COLOUR} background"
_SIZE, _POSITION = f"({_alternatives(SIZES)})", f"({_alternatives(POSITIONS)})"
_SINGLE_RE = re.compile(rf"a (?:{_SIZE} )?{_COLOUR} {_SHAPE}(?: in the {_POSITION})? {_BACKGROUND}")
_RELATIONAL_RE = re.compile(
    rf"a {_COLOUR} {_SHAPE} ({_alternatives(RELATIONS)}) a {_COLOUR} {_SHAPE} {_BACKGROUND}"
)


def _grammar_error(prompt: str, reason: str) -> ValueError:
    return ValueError(
        f"prompt {prompt!r} is outside the shapes-world grammar: {reason}. Expected "
        f"'{SINGLE_TEMPLATE}' or '{RELATIONAL_TEMPLATE}' with colours {', '.join(COLOURS)}; "
        f"shapes {', '.join(SHAPES)}; positions {', '.join(POSITIONS)}"
    )


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the shapes-world grammar into the attributes it states.

    Case, extra spaces, one final "." and "an" for "a" are accepted. Raises ValueError for anything
    else, and for prompts the world cannot show: a background equal to an object's colour, or two
    related objects that look the same.
    """
    words = str(prompt).lower().strip().removesuffix(".").split()
    text = " ".join("a" if word == "an" else word for word in words)
    if match := _SINGLE_RE.fullmatch(text):
        size, colour, shape, position, background = match.groups()
        spec = PromptSpec((ObjectSpec(colour, shape, size, position),), background)
    elif match := _RELATIONAL_RE.fullmatch(text):
        colour1, shape1, relation, colour2, shape2, background = match.groups()
        objects = (ObjectSpec(colour1, shape1), ObjectSpec(colour2, shape2))
        spec = PromptSpec(objects, background, relation)
    else:
        raise _grammar_error(prompt, _mismatch_reason(text))
    _validate(prompt, spec)
    return spec


def _mismatch_reason(text: str) -> str:
    known = {"a", "in", "the", "on", "background", "of", *COLOURS, *SHAPES, *SIZES}
    known |= {w for phrase in (*POSITIONS, *RELATIONS) for w in phrase.split()}
    if unknown := [w for w in text.split() if w not in known]:
        return f"unknown words {', '.join(map(repr, unknown))}"
    relational = re.search(rf"\b({_alternatives(RELATIONS)}) a\b", text)
    if relational and re.search(rf"\b({_alternatives(SIZES)}|in the)\b", text):
        return f"relational prompts state no size or position (both objects are {RELATIONAL_SIZE})"
    return "words are missing or out of order"


def _validate(prompt: str, spec: PromptSpec) -> None:
    if any(o.colour == spec.background for o in spec.objects):
        raise _grammar_error(prompt, "the background must differ in colour from the objects")
    if len(spec.objects) == 2 and spec.objects[0] == spec.objects[1]:
        raise _grammar_error(prompt, "the two objects must differ in colour or shape to be told apart")


# ------------------------------------------------------------------------------------------- sampling


def random_spec(
    rng: np.random.Generator, form: str | None = None, relational_fraction: float = 0.5
) -> PromptSpec:
    """A uniformly drawn, fully stated prompt spec of ``form`` ("single", "relational"; None: the
    relational form with probability ``relational_fraction``, else the single form)."""
    form = form or _draw_form(rng, relational_fraction)
    if form not in FORMS:
        raise ValueError(f"unknown caption form {form!r}; expected one of {', '.join(FORMS)}")
    if form == "single":
        size, position = SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        objects = (replace(_random_object(rng), size=size, position=position),)
        relation = None
    else:
        objects = (_random_object(rng), _random_object(rng))
        while objects[1] == objects[0]:
            objects = (objects[0], _random_object(rng))
        relation = RELATIONS[rng.integers(len(RELATIONS))]
    taken = {o.colour for o in objects}
    backgrounds = [c for c in COLOURS if c not in taken]
    return PromptSpec(objects, backgrounds[rng.integers(len(backgrounds))], relation)


def _draw_form(rng: np.random.Generator, relational_fraction: float) -> str:
    if relational_fraction == 0.5:  # the original fair draw, so seeded streams stay as they were
        return FORMS[rng.integers(len(FORMS))]
    return FORMS[int(rng.random() < relational_fraction)]


def _random_object(rng: np.random.Generator) -> ObjectSpec:
    colours = tuple(COLOURS)
    return ObjectSpec(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))])


def place(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A scene showing ``spec``: omitted sizes/positions drawn at random, then jittered placement."""
    if spec.relation is not None:
        return _place_pair(spec, rng)
    (obj,) = spec.objects
    size = obj.size or SIZES[rng.integers(len(SIZES))]
    position = obj.position or POSITIONS[rng.integers(len(POSITIONS))]
    extent = rng.uniform(*SIZE_EXTENTS[size])
    row, column = divmod(POSITIONS.index(position), GRID)
    centre = (rng.uniform(*_cell_range(column, extent)), rng.uniform(*_cell_range(row, extent)))
    return Scene((ShapeSpec(obj.colour, obj.shape, centre, extent),), spec.background)


def _cell_range(cell: int, extent: float) -> tuple[float, float]:
    """Where a centre may lie along one axis: inside its cell (with margin) and the canvas (with margin)."""
    step = IMAGE_SIZE / GRID
    low = max(cell * step + CELL_MARGIN, extent / 2 + EDGE_MARGIN)
    high = min((cell + 1) * step - CELL_MARGIN, IMAGE_SIZE - extent / 2 - EDGE_MARGIN)
    return low, high


def _place_pair(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """Place two objects so that objects[0] <relation> objects[1] holds with a clear margin."""
    extents = rng.uniform(*SIZE_EXTENTS[RELATIONAL_SIZE], size=2)
    reach = IMAGE_SIZE - 2 * EDGE_MARGIN - extents.sum() / 2  # the largest centre distance that fits
    along = rng.uniform(extents.sum() / 2 + RELATION_GAP, reach)
    across = rng.uniform(-RELATION_SLOPE, RELATION_SLOPE) * along
    sign = -1.0 if spec.relation in ("left of", "above") else 1.0
    offset = (sign * along, across) if spec.relation in ("left of", "right of") else (across, sign * along)
    second = tuple(_pair_coordinate(rng, d, extents) for d in offset)
    first = (second[0] + offset[0], second[1] + offset[1])
    objects = tuple(
        ShapeSpec(o.colour, o.shape, (float(c[0]), float(c[1])), float(e))
        for o, c, e in zip(spec.objects, (first, second), extents, strict=True)
    )
    return Scene(objects, spec.background, spec.relation)


def _pair_coordinate(rng: np.random.Generator, offset: float, extents: np.ndarray) -> float:
    """One coordinate of the second object such that both it and (it + offset) stay on the canvas."""
    low = [e / 2 + EDGE_MARGIN for e in extents]
    high = [IMAGE_SIZE - e / 2 - EDGE_MARGIN for e in extents]
    return rng.uniform(max(low[1], low[0] - offset), min(high[1], high[0] - offset))


def sample_scene(
    rng: np.random.Generator | int, form: str | None = None, relational_fraction: float = 0.5
) -> Scene:
    """A random scene of ``form`` ("single", "relational"; None: relational with probability
    ``relational_fraction``)."""
    rng = np.random.default_rng(rng)
    return place(random_spec(rng, form, relational_fraction), rng)


def scene_for_prompt(prompt: str, rng: np.random.Generator | int) -> Scene:
    """A random scene that shows ``prompt``; attributes it omits are drawn at random (reference images)."""
    return place(parse_prompt(prompt), np.random.default_rng(rng))


# ------------------------------------------------------------------------------------------ rendering


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as a 64x64 RGB image, anti-aliased by rendering at 4x and averaging 4x4 blocks."""
    side = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw_object(draw, obj, COLOURS[obj.colour])
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def coverage(obj: ShapeSpec) -> np.ndarray:
    """The fraction of each pixel of the 64x64 canvas that ``obj`` covers, as :func:`render` draws it."""
    side = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    _draw_object(ImageDraw.Draw(canvas), obj, 255)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeSpec, fill: tuple[int, int, int] | int) -> None:
    (x, y), half = obj.centre, obj.extent / 2
    # Supersampled pixel edges; PIL boxes include their last pixel, hence the -1.
    left, top, right, bottom = (round(v * SUPERSAMPLE) for v in (x - half, y - half, x + half, y + half))
    if obj.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:  # upright triangle: apex at the top centre, base along the bottom edge
        apex = round(x * SUPERSAMPLE)
        draw.polygon([(apex, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)


# -------------------------------------------------------------------------------------------- dataset


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack RGB images into a float32 tensor (N, 3, H, W) scaled to [-1, 1]."""
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ShapesDataset:
    """An infinite, deterministic stream of (image, caption) pairs.

    Item ``i`` is a pure function of ``(seed, i)``, so processes and loader workers can share the
    stream by index without coordination.
    """

    def __init__(self, seed: int = 0, form: str | None = None, relational_fraction: float = 0.5) -> None:
        if form is not None and form not in FORMS:
            raise ValueError(f"unknown caption form {form!r}; expected one of {', '.join(FORMS)} or None")
        if not 0.0 <= relational_fraction <= 1.0:
            raise ValueError(f"relational_fraction must be in [0, 1], got {relational_fraction}")
        self.seed, self.form, self.relational_fraction = seed, form, relational_fraction

    def scene_and_caption(self, index: int) -> tuple[Scene, str]:
        if index < 0:
            raise IndexError(f"ShapesDataset is infinite; index must be >= 0, got {index}")
        rng = np.random.default_rng((self.seed, index))
        scene = sample_scene(rng, self.form, self.relational_fraction)
        return scene, caption(scene, rng)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        scene, text = self.scene_and_caption(index)
        return render(scene), text

    def batches(
        self, batch_size: int, *, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Endless batches (images (N, 3, 64, 64) in [-1, 1], captions) from global batch ``start`` on.

        Global batch ``b`` holds items ``[b * batch_size * world_size, (b + 1) * batch_size * world_size)``;
        process ``rank`` takes its own contiguous ``batch_size`` slice, so ranks never share an item.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        step = start
        while True:
            first = (step * world_size + rank) * batch_size
            items = [self[i] for i in range(first, first + batch_size)]
            yield images_to_tensor([image for image, _ in items]), [text for _, text in items]
            step += 1
