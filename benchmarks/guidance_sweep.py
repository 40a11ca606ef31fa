"""How guidance settings change the default model's prompt adherence (README, "guidance interval"):
the same 60 single-object eval-shapes prompts and seeds under guidance on every step, with guidance
rescale, and only at noise levels sigma >= a threshold (``ModelConfig.guidance_min_sigma``).

    python benchmarks/guidance_sweep.py [--model default] [--n 60]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

# (guidance scale, guidance rescale, guidance_min_sigma)
SETTINGS = [
    (1.0, 0.0, 0.0),
    *[(scale, 0.0, 0.0) for scale in (3.0, 5.0, 7.5, 10.0)],
    *[(scale, 0.7, 0.0) for scale in (3.0, 5.0, 7.5)],
    (3.0, 0.0, 5.0),
    (5.0, 0.0, 5.0),
    (5.0, 0.0, 2.0),
    (5.0, 0.0, 10.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=60)
    args = parser.parse_args()
    import latentdiffusion as ld
    from latentdiffusion.evaluation.shapes_eval import eval_prompts, evaluate

    pipe = ld.load(args.model)
    prompts = eval_prompts(args.n, 0)["single"]
    print("| cfg | rescale | guided at sigma >= | colour | position | shape | whole prompt |")
    print("|---|---|---|---|---|---|---|")
    for scale, rescale, min_sigma in SETTINGS:
        pipe.components.config = replace(pipe.components.config, guidance_min_sigma=min_sigma)
        scores = evaluate(pipe, prompts, form="single", guidance_scale=scale, guidance_rescale=rescale).scores
        cells = [f"{100 * scores[k]:.0f}%" for k in ("colour", "position", "shape", "all")]
        print(f"| {scale:g} | {rescale:g} | {min_sigma:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
