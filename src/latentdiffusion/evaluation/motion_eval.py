"""Held-out evaluation of a text-to-video model on the moving-shapes world.

Held-out prompts are the captions of the moving-shapes stream of ``HELD_OUT_SEED`` (training draws clips
from the run's seed and evaluates on the next one, so this stream is apart from both for every seed
below it). Each prompt is animated once (``Pipeline.animate``, seed ``seed + i``) and judged by
:func:`latentdiffusion.evaluation.motion_checker.check_clip`; the report is the share of clips passing
each verdict and the mean frame-to-frame change (0-255), the clips' smoothness.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentdiffusion.evaluation.motion_checker import Track, judge, measure_clip, summarise
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
    on_clip: Callable[[int, str, dict[str, bool], Track], None] | None = None,
    clip_options: Callable[[str], dict[str, Any]] | None = None,
    **options: Any,
) -> MotionReport:
    """Animate every prompt (seed ``seed + i``, ``options`` as ``Pipeline.animate``'s, plus
    ``clip_options(prompt)`` where given) and judge it; ``on_clip(index, prompt, verdicts, track)`` hears
    of each clip as it is judged."""
    specs = [parse_motion_prompt(prompt) for prompt in prompts]  # refuse bad prompts before any work
    results, changes = [], []
    for index, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        extra = {} if clip_options is None else clip_options(prompt)
        clip = pipe.animate(
            prompt, motion_module=motion_module, frames=frames, seed=seed + index, **extra, **options
        )
        track = measure_clip(clip)
        results.append(judge(track, spec))
        changes.append(track.mean_frame_change)
        if on_clip is not None:
            on_clip(index, prompt, results[-1], track)
    return MotionReport(summarise(results), float(np.mean(changes)) if changes else 0.0, len(results))


def travel_words(track: Track) -> str:
    """The tracked object's net travel from the first to the last frame it is found in, as "moved
    (dx, dy) px" (x right, y down), or "no track" with fewer than two frames showing it."""
    centres = track.centres()
    if len(centres) < 2:
        return "no track"
    dx, dy = centres[-1] - centres[0]
    return f"moved ({dx:+.0f}, {dy:+.0f}) px"


def own_still(prompt: str) -> dict[str, Any]:
    """``clip_options`` for modules that animate a first frame: start from the still of the clip's own
    prompt, not the one the pipeline plans (``pipelines.animate.still_prompt_for``)."""
    return {"first_frame_prompt": prompt}


def clip_line(index: int, prompt: str, verdicts: dict[str, bool], track: Track) -> str:
    """A clip's line: its frame change, net travel and the verdicts it failed."""
    failed = [key for key, ok in verdicts.items() if not ok]
    return (
        f"{index:3d} {prompt!r}: change {track.mean_frame_change:.2f}, {travel_words(track)}, "
        f"failed {failed or 'none'}"
    )


def format_report(report: MotionReport) -> str:
    """One line: each verdict's pass rate (%) and the mean frame change."""
    rates = ", ".join(f"{key} {100 * rate:.1f}" for key, rate in report.rates.items())
    return f"{report.clips} clips: {rates} (%); mean frame change {report.mean_frame_change:.2f}"


def fresh_modules(pipe: Any, seed: int = 0) -> Any:
    """Untrained motion modules for ``pipe``'s U-Net (``proj_out`` at zero: every frame an independent
    image), the baseline a trained module must beat."""
    import torch

    from latentdiffusion.models.motion import MotionModules
    from latentdiffusion.training.motion import MotionOptions

    torch.manual_seed(seed)
    return MotionModules(MotionOptions().motion_config(pipe.components.config)).eval()


def print_clip(index: int, prompt: str, verdicts: dict[str, bool], track: Track) -> None:
    print(clip_line(index, prompt, verdicts, track), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m latentdiffusion.evaluation.motion_eval --clips N [--model M] [--motion-module FILE |
    --fresh] [--steps S] [--guidance G]``: held-out motion evaluation, one line per clip, then the pass
    rates."""
    import latentdiffusion as ld

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--clips", type=int, default=40, help="held-out prompts (default 40)")
    parser.add_argument("--model", default="default", help="the model (default: the shipped one)")
    parser.add_argument("--motion-module", default=None, help="unset: the default model's shipped module")
    parser.add_argument("--fresh", action="store_true", help="untrained (identity) modules: the baseline")
    parser.add_argument("--frames", type=int, default=FRAMES, help=f"frames per clip (default {FRAMES})")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    parser.add_argument(
        "--own-still",
        action="store_true",
        help="first-frame modules start from the still of the clip's own prompt (no start planning)",
    )
    parser.add_argument("--lora", default=None, help="a LoRA file merged into the model (spatial adapters)")
    args = parser.parse_args(argv)
    pipe = ld.load(args.model, loras=[] if args.lora is None else [(args.lora, 1.0)])
    module = fresh_modules(pipe) if args.fresh else args.motion_module
    options = {} if args.steps is None else {"steps": args.steps}
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    start = time.perf_counter()

    prompts = held_out_prompts(args.clips)
    report = evaluate_motion(
        pipe,
        module,
        prompts,
        frames=args.frames,
        seed=args.seed,
        on_clip=print_clip,
        clip_options=own_still if args.own_still else None,
        **options,
    )
    print(f"{format_report(report)}; {time.perf_counter() - start:.0f} s", file=sys.stdout)


if __name__ == "__main__":
    main()
