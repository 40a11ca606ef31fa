"""Prompt-adherence checker for moving-shapes clips (:mod:`latentdiffusion.training.moving_shapes`).

Each frame is analysed by the shapes-world checker (:func:`.shapes_checker.detect`);
the largest object of each frame is the tracked object, its centre the track. Verdicts for a prompt:

- "background", "colour", "shape": the majority over frames equals the prompt's word;
- "direction": moving prompts: the net displacement from the first to the last frame has the prompt's
  dominant axis and sign and is at least ``MIN_TRAVEL`` px long; bouncing prompts: the path along the
  prompt's axis is longer than across it, at least ``MIN_TRAVEL`` px, and turns at least once (the
  along-axis coordinate moves at least ``MIN_TRAVEL / 2`` px back after an extreme);
- "speed" (when stated): net travel at least ``SPEED_SPLIT`` px per 15 frame steps for "quickly", below
  for "slowly" (the world's slowly: 15-19 px, quickly: 30-37 px per clip of 16 frames);
- "growth" (when stated): the last frame's extent over the first's above ``GROWTH_RATIO`` ("growing")
  or below ``1 / GROWTH_RATIO`` ("shrinking");
- "consistency": an object in every frame, every frame's colour and shape equal to the majority, no
  frame-to-frame step of the centre longer than ``MAX_STEP`` px and no area change between neighbouring
  frames by more than a factor ``MAX_AREA_STEP``;
- "all": every verdict.

:func:`measure_clip` also reports the mean absolute frame-to-frame pixel change (0-255 scale).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from latentdiffusion.evaluation.shapes_checker import Detection, detect
from latentdiffusion.training.moving_shapes import (
    DIRECTION_VECTORS,
    FRAMES,
    MotionSpec,
    MovingShapesDataset,
    held_out,
    parse_motion_prompt,
    render_clip,
    tensor_to_frames,
)

MIN_TRAVEL = 8.0  # px of net (moving) or along-axis (bouncing) travel below which a clip is static
SPEED_SPLIT = 24.0  # px per 15 frame steps between "slowly" (15-19) and "quickly" (30-37)
GROWTH_RATIO = 1.15  # last / first extent beyond which an object grows (the world's growth is 1.35)
MAX_STEP = 8.0  # px; a longer jump of the centre between neighbouring frames is not smooth motion
MAX_AREA_STEP = 1.5  # factor; a larger area change between neighbouring frames is not the same object


@dataclass(frozen=True)
class Track:
    """The tracked object per frame (None where a frame shows none) and the clip's backgrounds."""

    backgrounds: tuple[str, ...]
    detections: tuple[Detection | None, ...]
    mean_frame_change: float  # mean |frame[t+1] - frame[t]| over pixels and channels, 0-255 scale

    @property
    def complete(self) -> bool:
        return all(d is not None for d in self.detections)

    def centres(self) -> np.ndarray:
        return np.array([d.centre for d in self.detections if d is not None], dtype=np.float64)


def as_frames(clip: torch.Tensor | Sequence[Image.Image]) -> list[Image.Image]:
    """Frames from a clip tensor ``[3, F, H, W]`` in [-1, 1] or a sequence of images."""
    if isinstance(clip, torch.Tensor):
        return tensor_to_frames(clip)
    return [frame.convert("RGB") for frame in clip]


def measure_clip(clip: torch.Tensor | Sequence[Image.Image]) -> Track:
    """Detect the largest object in every frame (the shapes-world checker) and the mean frame change."""
    frames = as_frames(clip)
    if len(frames) < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {len(frames)}")
    found = [detect(frame) for frame in frames]
    pixels = np.stack([np.asarray(frame, dtype=np.float32) for frame in frames])
    change = float(np.abs(np.diff(pixels, axis=0)).mean())
    return Track(tuple(b for b, _ in found), tuple(d[0] if d else None for _, d in found), change)


def _majority(values: Sequence[str]) -> str | None:
    return Counter(values).most_common(1)[0][0] if values else None


def check_clip(clip: torch.Tensor | Sequence[Image.Image], prompt: str) -> dict[str, bool]:
    """Whether ``clip`` shows each attribute of the moving-shapes ``prompt`` (keys: see the module
    docstring; "speed" and "growth" only when stated). Raises ValueError outside the grammar."""
    return judge(measure_clip(clip), parse_motion_prompt(prompt))


def judge(track: Track, spec: MotionSpec) -> dict[str, bool]:
    """The verdicts of :func:`check_clip` for a measured ``track``."""
    present = [d for d in track.detections if d is not None]
    colour = _majority([d.colour for d in present])
    shape = _majority([d.shape for d in present])
    result = {
        "background": _majority(track.backgrounds) == spec.background,
        "colour": colour == spec.colour,
        "shape": shape == spec.shape,
        "direction": len(present) >= 2 and _direction_holds(track.centres(), spec),
    }
    steps = len(track.detections) - 1
    if spec.speed is not None:
        travel = _net_travel(track.centres()) * (FRAMES - 1) / steps if len(present) >= 2 else 0.0
        result["speed"] = (travel >= SPEED_SPLIT) == (spec.speed == "quickly")
    if spec.growth is not None:
        result["growth"] = len(present) >= 2 and _growth_holds(
            present[0].extent, present[-1].extent, spec.growth
        )
    result["consistency"] = track.complete and _consistent(present, colour, shape)
    result["all"] = all(result.values())
    return result


def _net_travel(centres: np.ndarray) -> float:
    return float(np.linalg.norm(centres[-1] - centres[0]))


def _direction_holds(centres: np.ndarray, spec: MotionSpec) -> bool:
    axis = 0 if spec.axis == "horizontal" else 1
    if spec.motion == "moving":
        displacement = centres[-1] - centres[0]
        sign = sum(DIRECTION_VECTORS[spec.direction])
        dominant = abs(displacement[axis]) > abs(displacement[1 - axis])
        return dominant and sign * displacement[axis] >= MIN_TRAVEL
    along, across = centres[:, axis], centres[:, 1 - axis]
    path_along, path_across = np.abs(np.diff(along)).sum(), np.abs(np.diff(across)).sum()
    return path_along > path_across and path_along >= MIN_TRAVEL and _turns(along)


def _turns(along: np.ndarray) -> bool:
    """Whether the coordinate rises by MIN_TRAVEL / 2 to a peak and falls as far after it (or the
    mirror image: falls to a trough, then rises)."""
    return max(_peak(along), _peak(-along)) >= MIN_TRAVEL / 2


def _peak(values: np.ndarray) -> float:
    """The largest min(rise before t, fall after t) over frames t."""
    rise = values - np.minimum.accumulate(values)
    fall = values - np.minimum.accumulate(values[::-1])[::-1]
    return float(np.minimum(rise, fall).max())


def _growth_holds(first: float, last: float, growth: str) -> bool:
    ratio = last / max(first, 1e-6)
    return ratio > GROWTH_RATIO if growth == "growing" else ratio < 1 / GROWTH_RATIO


def _consistent(present: list[Detection], colour: str | None, shape: str | None) -> bool:
    if any(d.colour != colour or d.shape != shape for d in present):
        return False
    centres = np.array([d.centre for d in present])
    areas = np.array([max(d.area, 1e-6) for d in present])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    area_steps = np.exp(np.abs(np.diff(np.log(areas))))
    return bool(steps.max() <= MAX_STEP and area_steps.max() <= MAX_AREA_STEP)


def summarise(results: list[dict[str, bool]]) -> dict[str, float]:
    """Share of clips passing each verdict, over the clips whose prompt states it."""
    keys = sorted({key for result in results for key in result}, key=lambda k: (k == "all", k))
    return {key: float(np.mean([r[key] for r in results if key in r])) for key in keys}


def acceptance_on_rendered(
    clips: int, seed: int = 1, frames: int = FRAMES, perturb: bool = False
) -> dict[str, float]:
    """The checker on the world's own clips (the held-out stream of training seed ``seed - 1``); with
    ``perturb``, each frame is blurred (Gaussian, sigma 0.3-0.8 px) and noised (std 8 of 255) first."""
    dataset, rng = held_out(MovingShapesDataset(seed - 1, frames)), np.random.default_rng(seed)
    results = []
    for index in range(clips):
        clip, text = dataset.clip_and_caption(index)
        images = render_clip(clip)
        results.append(check_clip([_perturb(i, rng) for i in images] if perturb else images, text))
    return summarise(results)


def _perturb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, size=(*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m latentdiffusion.evaluation.motion_checker --clips N [--perturb]``: acceptance on
    rendered clips."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--perturb", action="store_true", help="blur and noise every frame first")
    args = parser.parse_args(argv)
    for key, value in acceptance_on_rendered(args.clips, args.seed, args.frames, args.perturb).items():
        print(f"{key}: {100 * value:.1f}%")


if __name__ == "__main__":
    main()
