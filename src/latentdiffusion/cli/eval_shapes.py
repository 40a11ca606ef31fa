"""``ldm eval-shapes``: prompt adherence of a model on the shapes world, with and without guidance."""

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
    restart_spec,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval-shapes",
        help="score prompt adherence on random shapes-world prompts",
        formatter_class=formatter,
        description="Generate images for random prompts of both caption forms (single object; two objects "
        "and a relation) and judge each stated attribute with the image-analysis checker. Runs every "
        "prompt at cfg 1.0 and at each --cfg (default: the model's own guidance scale), with the same seeds, "
        "and prints a markdown table. The checker is strict by default (shape criteria, flat fills and "
        "background, object count; see docs/benchmarks.md).",
    )
    add_model_option(parser)
    parser.add_argument("--n", type=positive_int, default=200, help="prompts per caption form")
    parser.add_argument(
        "--cfg",
        type=finite_float,
        nargs="+",
        default=None,
        help="guidance scales compared with 1.0 (default: the model's)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps (default: the model's)"
    )
    parser.add_argument(
        "--sampler", default=None, help="sampler name, see `ldm samplers` (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the first image")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per generate call")
    parser.add_argument(
        "--token-merging",
        type=finite_float,
        default=None,
        metavar="R",
        help="generate with token merging ratio R (as `ldm generate --token-merging`)",
    )
    parser.add_argument(
        "--restart",
        type=restart_spec,
        default=(0, 1),
        metavar="STEPS[xTIMES]",
        help="generate with restart sampling (as `ldm generate --restart`); 0 = off",
    )
    parser.add_argument(
        "--eps-scaling",
        type=finite_float,
        default=None,
        metavar="F",
        help="generate with epsilon scaling F (as `ldm generate --eps-scaling`; default: the model's)",
    )
    add_refiner_options(parser)
    parser.add_argument(
        "--grid", type=Path, default=Path("eval-shapes.png"), help="PNG grid of the images at the first --cfg"
    )
    checker = parser.add_mutually_exclusive_group()
    checker.add_argument(
        "--lenient",
        action="store_true",
        help="judge with the earlier lenient checker (best-fitting template only; no flatness or count)",
    )
    checker.add_argument(
        "--compare",
        action="store_true",
        help="print the strict and the lenient verdicts of the same images side by side",
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from latentdiffusion.errors import UserError
    from latentdiffusion.evaluation.shapes_eval import eval_prompts, evaluate, format_table, grid, rescore
    from latentdiffusion.files import atomic_write
    from latentdiffusion.pipelines.sampling import model_options

    pipe = load_model(args)  # --lora and --prediction-type apply here too
    refiner = load_refiner(args)
    defaults = model_options(pipe.config, args.steps, args.sampler, None, None, eps_scaling=args.eps_scaling)
    steps, sampler = defaults.steps, defaults.sampler
    shown_scale, *more = args.cfg or [defaults.guidance_scale]
    prompts = eval_prompts(args.n, args.seed)
    settings = {
        "steps": steps,
        "sampler": sampler,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "token_merging": args.token_merging,  # None: off, as generate's default
        "restart": args.restart,
        "eps_scaling": args.eps_scaling,  # None: the model's
        "refiner": refiner,
        "refiner_switch": args.refiner_switch,
    }
    results, start = [], time.perf_counter()
    for scale in sorted({1.0, shown_scale, *more}):
        for form, form_prompts in prompts.items():
            result = evaluate(
                pipe, form_prompts, form=form, guidance_scale=scale, strict=not args.lenient, **settings
            )
            results.append(result)
            if args.compare:
                results.append(rescore(result, strict=False))
    seconds = time.perf_counter() - start
    print(format_table(results))
    images = sum(len(r.images) for r in results if r.strict != args.lenient)
    print(
        f"\n{images} images in {seconds:.1f} s ({images / seconds:.2f} images/s, {steps} steps "
        f"{sampler}"
        + (f", eps scaling {defaults.eps_scaling:g}" if defaults.eps_scaling != 1 else "")
        + f"); model {args.model}"
        + refiner_note(pipe, refiner, args.refiner, args.refiner_switch)
    )
    shown = [
        image
        for r in results
        if r.guidance_scale == shown_scale and r.strict != args.lenient
        for image in r.images[:32]
    ]
    try:
        atomic_write(args.grid, lambda tmp: grid(shown).save(tmp, format="PNG"))
    except OSError as error:
        raise UserError(f"cannot write {args.grid}: {error.strerror or error}") from None
    print(f"grid: {args.grid}")
    return 0


def refiner_note(pipe, refiner, name: str | None, switch: float | None) -> str:
    """What finished the images (``text_to_image.chosen_refiner``): the refiner ``name`` given, the
    model's bundled one, or none."""
    from latentdiffusion.pipelines.text_to_image import chosen_refiner

    chosen, switch = chosen_refiner(pipe, refiner, switch, control=False)
    if chosen is None:
        return ", no refiner" if switch == 1 else ""
    return f", {'its bundled refiner' if refiner is None else f'refiner {name}'} from {switch}"
