"""The "moving shapes" world: the shapes world (:mod:`latentdiffusion.training.shapes`) in motion.

Short captioned clips for training and judging text-to-video motion modules on top of the default model.
Each clip shows one small object of the shapes world on a plain background, moving in a straight line:

- ``a <colour> <shape> moving <left|right|up|down> [slowly|quickly] [and <growing|shrinking>] on a
  <colour> background``
- ``a <colour> <shape> bouncing <left and right|up and down> [and <growing|shrinking>] on a <colour>
  background``

Frames are drawn by the shapes world's own :func:`~latentdiffusion.training.shapes.render`, so every frame
is an image of that world (same palette, shapes, anti-aliasing). Geometry, in pixels of the 64x64 canvas,
for a clip of ``F`` frames:

- the object is small (the shapes world's ``SIZE_EXTENTS["small"]``, 12-16 px); growing clips scale its
  extent linearly from ``e`` to ``GROWTH * e`` over the clip, shrinking ones from ``GROWTH * e`` to ``e``,
  so it stays below the world's size threshold (21.5 px) throughout;
- a "moving" object travels a total of ``TRAVEL["slowly"]`` (15-19 px) or ``TRAVEL["quickly"]`` (30-37
  px) in a straight line along its axis, the same distance per frame, and never reaches ``EDGE_MARGIN``;
  the speed word is stated with probability 1/2;
- a "bouncing" object travels ``BOUNCE_TRAVEL`` (1.2-1.8) times its free range along the axis, reflected
  at the borders of that range, so it turns at least once; it starts moving towards the right or down
  (rightwards for "left and right", downwards for "up and down") or the opposite way, at random;
- across the axis the object keeps one coordinate, drawn anywhere on the canvas with margin.

Clips are tensors ``[3, F, H, W]`` in [-1, 1], the range of the shapes world's training images.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from latentdiffusion.training.shapes import (
    COLOURS,
    EDGE_MARGIN,
    GRID,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZE_EXTENTS,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapeSpec,
    format_prompt,
    grid_cell,
    images_to_tensor,
    render,
    size_of,
)

FRAMES = 16  # the default clip length: the 16-frame context of AnimateDiff's motion modules
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")
GROWTHS = ("growing", "shrinking")
BOUNCE_AXES = ("left and right", "up and down")
MOTIONS = ("moving", "bouncing")
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
TRAVEL: dict[str, tuple[float, float]] = {"slowly": (15.0, 19.0), "quickly": (30.0, 37.0)}  # px per clip
BOUNCE_TRAVEL = (1.2, 1.8)  # a bouncing object's path length, in multiples of its free range along the axis
GROWTH = 1.35  # a growing object ends GROWTH times as wide as it starts (16 * 1.35 = 21.6 ~ the threshold)
START_EXTENT = (12.0, 15.5)  # px; growing/shrinking clips stay small (15.5 * 1.35 < 21.5)
BOUNCING_FRACTION = 0.25  # share of bouncing clips
GROWTH_FRACTION = 0.25  # share of clips that grow or shrink
SPEED_KEEP_PROBABILITY = 0.5  # chance that a moving clip's caption states its speed

MOVING_TEMPLATE = (
    "a <colour> <shape> moving <left|right|up|down> [slowly|quickly] [and <growing|shrinking>] "
    "on a <colour> background"
)
BOUNCING_TEMPLATE = (
    "a <colour> <shape> bouncing <left and right|up and down> [and <growing|shrinking>] "
    "on a <colour> background"
)


@dataclass(frozen=True)
class MotionSpec:
    """What a moving-shapes caption states; ``speed``/``growth`` None mean "not stated" (in a clip: none)."""

    colour: str
    shape: str
    background: str
    motion: str  # "moving" or "bouncing"
    direction: str  # moving: left/right/up/down; bouncing: the first direction of travel
    speed: str | None = None
    growth: str | None = None

    @property
    def axis(self) -> str:
        """ "horizontal" or "vertical"."""
        return "horizontal" if self.direction in ("left", "right") else "vertical"


@dataclass(frozen=True)
class Clip:
    """One clip: its full spec (speed always set for moving clips), and the object in every frame."""

    spec: MotionSpec
    frames: tuple[ShapeSpec, ...]

    def scenes(self) -> list[Scene]:
        return [Scene((obj,), self.spec.background) for obj in self.frames]


# ------------------------------------------------------------------------------------------- captions


def format_motion_prompt(spec: MotionSpec) -> str:
    """The caption of ``spec`` (inverse of :func:`parse_motion_prompt`)."""
    if spec.motion == "moving":
        words = ["a", spec.colour, spec.shape, "moving", spec.direction, spec.speed]
    else:
        words = ["a", spec.colour, spec.shape, "bouncing", BOUNCE_AXES[spec.axis == "vertical"]]
    words += [spec.growth and f"and {spec.growth}", f"on a {spec.background} background"]
    return " ".join(word for word in words if word)


def motion_caption(spec: MotionSpec, rng: np.random.Generator | int) -> str:
    """A caption of a clip's full ``spec``: the speed is stated with probability 1/2."""
    rng = np.random.default_rng(rng)
    keep_speed = rng.random() < SPEED_KEEP_PROBABILITY
    return format_motion_prompt(spec if keep_speed else _without_speed(spec))


def _without_speed(spec: MotionSpec) -> MotionSpec:
    return replace(spec, speed=None)


def _alternatives(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOUR, _SHAPE = f"({_alternatives(tuple(COLOURS))})", f"({_alternatives(SHAPES)})"
_TAIL = rf"(?: and ({_alternatives(GROWTHS)}))? on a {_COLOUR} background"
_MOVING_RE = re.compile(
    rf"a {_COLOUR} {_SHAPE} moving ({_alternatives(DIRECTIONS)})(?: ({_alternatives(SPEEDS)}))?{_TAIL}"
)
_BOUNCING_RE = re.compile(rf"a {_COLOUR} {_SHAPE} bouncing ({_alternatives(BOUNCE_AXES)}){_TAIL}")


def parse_motion_prompt(prompt: str) -> MotionSpec:
    """Parse a moving-shapes prompt. Case, extra spaces, one final "." and "an" for "a" are accepted;
    anything else, or a background the colour of the object, raises ValueError. A bouncing prompt's
    ``direction`` is the axis's positive one ("right" or "down"); the checker judges only the axis."""
    words = str(prompt).lower().strip().removesuffix(".").split()
    text = " ".join("a" if word == "an" else word for word in words)
    if match := _MOVING_RE.fullmatch(text):
        colour, shape, direction, speed, growth, background = match.groups()
        spec = MotionSpec(colour, shape, background, "moving", direction, speed, growth)
    elif match := _BOUNCING_RE.fullmatch(text):
        colour, shape, axis, growth, background = match.groups()
        direction = "right" if axis == "left and right" else "down"
        spec = MotionSpec(colour, shape, background, "bouncing", direction, None, growth)
    else:
        raise _grammar_error(prompt, "words are missing, unknown or out of order")
    if spec.colour == spec.background:
        raise _grammar_error(prompt, "the background must differ in colour from the object")
    return spec


OPPOSITE_DIRECTIONS = {"left": "right", "right": "left", "up": "down", "down": "up"}
OTHER_AXIS_DIRECTIONS = {"right": "down", "down": "right"}  # bouncing specs keep the axis's positive word
OPPOSITE_GROWTHS = {"growing": "shrinking", "shrinking": "growing"}


def reversed_motion_prompt(prompt: str) -> str | None:
    """``prompt`` with its motion turned round: a moving object's direction reversed ("right" <-> "left",
    "up" <-> "down"), a bouncing one's axis swapped, growing <-> shrinking; colours, shape and speed kept.
    None for a prompt outside the grammar."""
    try:
        spec = parse_motion_prompt(prompt)
    except ValueError:
        return None
    direction = (OPPOSITE_DIRECTIONS if spec.motion == "moving" else OTHER_AXIS_DIRECTIONS)[spec.direction]
    growth = spec.growth and OPPOSITE_GROWTHS[spec.growth]
    return format_motion_prompt(replace(spec, direction=direction, growth=growth))


def _grammar_error(prompt: str, reason: str) -> ValueError:
    return ValueError(
        f"prompt {prompt!r} is outside the moving-shapes grammar: {reason}. Expected '{MOVING_TEMPLATE}' "
        f"or '{BOUNCING_TEMPLATE}' with colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}"
    )


# ------------------------------------------------------------------------------------------- sampling


def random_motion_spec(rng: np.random.Generator) -> MotionSpec:
    """A uniformly drawn, fully stated spec (moving clips always carry their speed)."""
    colours = tuple(COLOURS)
    colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
    backgrounds = [c for c in colours if c != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    motion = MOTIONS[int(rng.random() < BOUNCING_FRACTION)]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    speed = SPEEDS[rng.integers(len(SPEEDS))] if motion == "moving" else None
    growth = GROWTHS[rng.integers(len(GROWTHS))] if rng.random() < GROWTH_FRACTION else None
    return MotionSpec(colour, shape, background, motion, direction, speed, growth)


def extents(spec: MotionSpec, start: float, frames: int) -> np.ndarray:
    """The object's extent in each frame: constant, or linear between ``start`` and ``GROWTH * start``."""
    ramp = np.linspace(0.0, 1.0, frames)
    if spec.growth == "growing":
        return start * (1 + (GROWTH - 1) * ramp)
    if spec.growth == "shrinking":
        return start * (GROWTH - (GROWTH - 1) * ramp)
    return np.full(frames, start)


def place_clip(spec: MotionSpec, rng: np.random.Generator, frames: int = FRAMES) -> Clip:
    """A clip showing ``spec`` (a bouncing spec's ``direction`` is its first direction of travel)."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    if spec.motion == "moving" and spec.speed is None:
        spec = replace(spec, speed=SPEEDS[rng.integers(len(SPEEDS))])
    growth = GROWTH if spec.growth else 1.0
    start = rng.uniform(*(START_EXTENT if spec.growth else SIZE_EXTENTS["small"]))
    sizes = extents(spec, start, frames)
    low, high = start * growth / 2 + EDGE_MARGIN, IMAGE_SIZE - start * growth / 2 - EDGE_MARGIN
    across = rng.uniform(low, high)
    sign = sum(DIRECTION_VECTORS[spec.direction])
    ramp = np.linspace(0.0, 1.0, frames)
    if spec.motion == "moving":
        travel = rng.uniform(*TRAVEL[spec.speed])
        begin = rng.uniform(low, high - travel)
        along = begin + travel * ramp if sign > 0 else high - (begin - low) - travel * ramp
    else:
        span = high - low
        path = rng.uniform(*BOUNCE_TRAVEL) * span
        offset = rng.uniform(0.0, span) + sign * path * ramp  # unfolded position, reflected below
        along = low + _reflect(offset, span)
    axis_x = spec.axis == "horizontal"
    objects = tuple(
        ShapeSpec(
            spec.colour,
            spec.shape,
            (float(a), float(across)) if axis_x else (float(across), float(a)),
            float(e),
        )
        for a, e in zip(along, sizes, strict=True)
    )
    return Clip(spec, objects)


def _reflect(offset: np.ndarray, span: float) -> np.ndarray:
    """Fold an unbounded coordinate into [0, span] by reflection at both ends (a triangle wave)."""
    folded = np.mod(offset, 2 * span)
    return np.where(folded > span, 2 * span - folded, folded)


def sample_clip(rng: np.random.Generator | int, frames: int = FRAMES) -> Clip:
    """A random clip of ``frames`` frames."""
    rng = np.random.default_rng(rng)
    return place_clip(random_motion_spec(rng), rng, frames)


def clip_for_prompt(prompt: str, rng: np.random.Generator | int, frames: int = FRAMES) -> Clip:
    """A random clip that shows ``prompt`` (reference clips); a bouncing prompt starts either way."""
    rng = np.random.default_rng(rng)
    spec = parse_motion_prompt(prompt)
    if spec.motion == "bouncing" and rng.random() < 0.5:
        spec = replace(spec, direction={"right": "left", "down": "up"}[spec.direction])
    return place_clip(spec, rng, frames)


def start_prompt(prompt: str, rng: np.random.Generator | int) -> str:
    """A still prompt of the shapes world for the first frame of a clip of ``prompt``: its object (small,
    as the world's moving objects are) and background, in the grid cell a clip of it starts from. A
    moving object starts in the edge column (row) it moves away from ("moving right" at the left), in
    the row (column) across its axis of a clip placed as the world places one (``clip_for_prompt``); a
    bouncing one where that clip starts. Modules that animate a first frame
    (``MotionConfig.first_frame``) cannot move an object along a path that the still leaves no room for;
    this is a start with room for every speed."""
    spec = parse_motion_prompt(prompt)
    first = clip_for_prompt(prompt, rng, frames=2).frames[0]
    row, column = grid_cell(first.centre[1]), grid_cell(first.centre[0])
    if spec.motion == "moving":
        edge = 0 if sum(DIRECTION_VECTORS[spec.direction]) > 0 else GRID - 1
        row, column = (row, edge) if spec.axis == "horizontal" else (edge, column)
    obj = ObjectSpec(spec.colour, spec.shape, size_of(first.extent), POSITIONS[row * GRID + column])
    return format_prompt(PromptSpec((obj,), spec.background))


# ------------------------------------------------------------------------------------------ rendering


def render_clip(clip: Clip) -> list[Image.Image]:
    """Every frame of ``clip`` as a 64x64 RGB image, by the shapes world's renderer."""
    return [render(scene) for scene in clip.scenes()]


def frames_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Frames as one clip tensor ``[3, F, H, W]`` in [-1, 1] (the shapes world's training range)."""
    return images_to_tensor(images).permute(1, 0, 2, 3).contiguous()


def tensor_to_frames(clip: torch.Tensor) -> list[Image.Image]:
    """The inverse of :func:`frames_to_tensor`: a ``[3, F, H, W]`` tensor in [-1, 1] as RGB images."""
    if clip.ndim != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected a clip tensor [3, F, H, W], got shape {tuple(clip.shape)}")
    pixels = ((clip.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in pixels.unbind(1)]


# -------------------------------------------------------------------------------------------- dataset


class MovingShapesDataset:
    """An infinite, deterministic stream of (clip ``[3, F, 64, 64]`` in [-1, 1], caption) pairs.

    Item ``i`` is a pure function of ``(seed, i)``. As for the shapes world, a held-out split is the
    stream of another seed (training uses ``seed``, evaluation ``seed + 1``: see :func:`held_out`).
    """

    def __init__(self, seed: int = 0, frames: int = FRAMES) -> None:
        if frames < 2:
            raise ValueError(f"a clip needs at least 2 frames, got {frames}")
        self.seed, self.frames = seed, frames

    def clip_and_caption(self, index: int) -> tuple[Clip, str]:
        if index < 0:
            raise IndexError(f"MovingShapesDataset is infinite; index must be >= 0, got {index}")
        rng = np.random.default_rng((self.seed, index))
        clip = sample_clip(rng, self.frames)
        return clip, motion_caption(clip.spec, rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        clip, text = self.clip_and_caption(index)
        return frames_to_tensor(render_clip(clip)), text

    def batches(
        self, batch_size: int, *, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Endless batches (clips ``[N, 3, F, 64, 64]`` in [-1, 1], captions) from global batch ``start``
        on; rank ``r`` takes its own contiguous slice of each global batch, as the shapes dataset does."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        step = start
        while True:
            first = (step * world_size + rank) * batch_size
            items = [self[i] for i in range(first, first + batch_size)]
            yield torch.stack([clip for clip, _ in items]), [text for _, text in items]
            step += 1


def held_out(dataset: MovingShapesDataset) -> MovingShapesDataset:
    """The held-out split of ``dataset``: the stream of the next seed, never seen in training."""
    return MovingShapesDataset(dataset.seed + 1, dataset.frames)
