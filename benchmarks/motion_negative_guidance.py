"""Does guidance against the opposite motion make clips move the named way? Each held-out clip is made
with its caption's motion reversed (``training.moving_shapes.reversed_motion_prompt``) as the negative
prompt, and judged as ``evaluation.motion_eval`` judges clips.

    python benchmarks/motion_negative_guidance.py MODULE [--clips 20] [--guidance 1.5]

Clip i uses seed i, as ``motion_eval`` (whose figures for the same clips and module, with the usual
empty negative prompt, are the baseline). Prints one line per clip, then the pass rates.
"""

from __future__ import annotations

import argparse

import numpy as np

import latentdiffusion as ld
from latentdiffusion.evaluation.motion_checker import judge, measure_clip
from latentdiffusion.evaluation.motion_eval import held_out_prompts, summarise
from latentdiffusion.training.moving_shapes import parse_motion_prompt, reversed_motion_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="a motion-module file (its learned words beside it are used)")
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.5)
    args = parser.parse_args()
    pipe = ld.load("default")
    results, changes = [], []
    for index, prompt in enumerate(held_out_prompts(args.clips)):
        clip = pipe.animate(
            prompt,
            negative_prompt=reversed_motion_prompt(prompt),
            motion_module=args.module,
            seed=index,
            guidance_scale=args.guidance,
        )
        track = measure_clip(clip)
        results.append(judge(track, parse_motion_prompt(prompt)))
        changes.append(track.mean_frame_change)
        failed = [key for key, ok in results[-1].items() if not ok]
        print(f"{index:3d} {prompt!r}: change {changes[-1]:.2f}, failed {failed or 'none'}", flush=True)
    rates = ", ".join(f"{key} {100 * rate:.1f}" for key, rate in summarise(results).items())
    print(f"{len(results)} clips: {rates} (%); mean frame change {np.mean(changes):.2f}")


if __name__ == "__main__":
    main()
