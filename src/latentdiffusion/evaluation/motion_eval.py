"""Held-out evaluation of a text-to-video model on the moving-shapes world.

Held-out prompts are the captions of the moving-shapes stream of ``HELD_OUT_SEED`` (training draws clips
from the run's seed and evaluates on the next one, so this stream is apart from both for every seed
below it). Each prompt is animated once (``Pipeline.animate``, seed ``seed + i``) and judged by
:func:`latentdiffusion.evaluation.motion_checker.check_clip`; the report is the share of clips passing
each verdict and the mean frame-to-frame change (0-255), the clips' smoothness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentdiffusion.evaluation.motion_checker import judge, measure_clip, summarise
from latentdiffusion.training.moving_shapes import FRAMES, MovingShapesDataset, parse_motion_prompt

HELD_OUT_SEED = 4343  # a moving-shapes stream that no training run's (seed, seed + 1) pair reaches below it


def held_out_prompts(count: int, seed: int = HELD_OUT_SEED) -> list[str]:
    """The first ``count`` captions of the held-out moving-shapes stream."""
    dataset = MovingShapesDataset(seed)
    return [dataset.clip_and_caption(index)[1] for index in range(count)]


@dataclass(frozen=True)
class MotionReport:
    """Per-verdict pass rates over the clips whose prompt states the verdict, and the mean frame change."""

    rates: dict[str, float]
    mean_frame_change: float
    clips: int


def evaluate_motion(
    pipe: Any,
    motion_module: str | Path | Any,
    prompts: Sequence[str],
    *,
    frames: int = FRAMES,
    seed: int = 0,
    **options: Any,
) -> MotionReport:
    """Animate every prompt (seed ``seed + i``, ``options`` as ``Pipeline.animate``'s) and judge it."""
    specs = [parse_motion_prompt(prompt) for prompt in prompts]  # refuse bad prompts before any work
    results, changes = [], []
    for index, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        clip = pipe.animate(prompt, motion_module=motion_module, frames=frames, seed=seed + index, **options)
        track = measure_clip(clip)
        results.append(judge(track, spec))
        changes.append(track.mean_frame_change)
    return MotionReport(summarise(results), float(np.mean(changes)) if changes else 0.0, len(results))
