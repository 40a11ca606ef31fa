"""Does guidance against the opposite motion make clips move the named way? Each held-out clip is made
with its caption's motion reversed (``training.moving_shapes.reversed_motion_prompt``) as the negative
prompt, and judged as ``evaluation.motion_eval`` judges clips.

    python benchmarks/motion_negative_guidance.py MODULE [--clips 20] [--guidance 1.5]

Clip i uses seed i, as ``motion_eval`` (whose figures for the same clips and module, with the usual
empty negative prompt, are the baseline). Prints one line per clip, then the pass rates.
"""

from __future__ import annotations

import argparse

import latentdiffusion as ld
from latentdiffusion.evaluation.motion_eval import (
    evaluate_motion,
    format_report,
    held_out_prompts,
    print_clip,
)
from latentdiffusion.training.moving_shapes import reversed_motion_prompt


def against_the_opposite_motion(prompt: str) -> dict[str, str | None]:
    return {"negative_prompt": reversed_motion_prompt(prompt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="a motion-module file (its learned words beside it are used)")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.5)
    args = parser.parse_args()
    report = evaluate_motion(
        ld.load("default"),
        args.module,
        held_out_prompts(args.clips),
        on_clip=print_clip,
        clip_options=against_the_opposite_motion,
        guidance_scale=args.guidance,
    )
    print(format_report(report))


if __name__ == "__main__":
    main()
