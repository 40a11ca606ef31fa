"""``ldm shapes-pairs``: preference pairs for ``ldm finetune --dpo`` from a model's own shapes-world
images, judged by the strict checker (``evaluation.shapes_pairs``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiffusion.cli.common import (
    add_model_option,
    add_refiner_options,
    finite_float,
    formatter,
    load_model,
    load_refiner,
    positive_int,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "shapes-pairs",
        help="make preference pairs (for ldm finetune --dpo) from a model's shapes-world images",
        formatter_class=formatter,
        description="Generate --per-prompt images for each of --prompts random shapes-world prompts, judge "
        "each with the strict checker, and pair images that pass the whole prompt with images of the same "
        "prompt that do not. Writes OUTPUT/pairs.jsonl and OUTPUT/images/; run it again with the same "
        "options to continue an interrupted folder.",
    )
    add_model_option(parser)
    add_refiner_options(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder of the pairs")
    parser.add_argument("--prompts", type=positive_int, default=1000, help="random prompts")
    parser.add_argument("--per-prompt", type=positive_int, default=8, help="images per prompt (>= 2)")
    parser.add_argument(
        "--seed", type=int, default=100_000, help="seed of the prompts and of the first image"
    )
    parser.add_argument(
        "--relational", type=finite_float, default=0.5, help="share of two-object (relational) prompts"
    )
    parser.add_argument(
        "--cfg", type=finite_float, default=None, help="guidance scale (default: the model's)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps (default: the model's)"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.evaluation.shapes_pairs import PairSettings, make_pairs

    settings = PairSettings(
        prompts=args.prompts,
        per_prompt=args.per_prompt,
        seed=args.seed,
        relational_fraction=args.relational,
        guidance_scale=args.cfg,
        steps=args.steps,
    )
    pipe, refiner = load_model(args), load_refiner(args)

    def generate(prompts: list[str], seed: int):
        return pipe.generate(
            prompts,
            seed=seed,
            guidance_scale=settings.guidance_scale,
            steps=settings.steps,
            refiner=refiner,
            refiner_switch=args.refiner_switch,
        )

    count = make_pairs(generate, args.output, settings)
    print(f"{count} pairs in {args.output}")
    return 0
