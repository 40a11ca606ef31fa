"""``ldm generate``: text-to-image from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latentdiffusion.cli.common import (
    add_model_option,
    add_output_options,
    add_refiner_options,
    add_sampling_options,
    check_output,
    finite_float,
    formatter,
    image_size,
    load_model,
    load_refiner,
    positive_int,
    resolve_seed,
    sampling_settings,
    save_images,
    seed_number,
)
from latentdiffusion.cli.prompt_loras import add_lora_dir_option, take_prompt_loras, with_prompt_loras


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="make images from a text prompt", formatter_class=formatter)
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument("--negative", default="", help="what the image should not show")
    add_model_option(parser)
    add_lora_dir_option(parser)
    add_sampling_options(parser)
    parser.add_argument("--size", type=image_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--num-images", type=positive_int, default=1, help="images to make")
    parser.add_argument(
        "--variation-seed", type=seed_number, default=None, help="seed whose noise each image moves towards"
    )
    parser.add_argument(
        "--variation-strength",
        type=finite_float,
        default=0.0,
        help="how far towards the variation seed's noise, 0..1 (0.1-0.3: variations of the same picture)",
    )
    add_refiner_options(parser)
    add_speed_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=run)


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the measured fast configuration: --precision auto --deepcache 3 --backend auto (OpenVINO "
        "where it is installed and the CPU has native bfloat16: its first image at a new size converts the "
        "U-Net for minutes, later ones load it from the disk cache; docs/benchmarks.md); an explicit "
        "--precision, --deepcache or --backend given with it wins",
    )
    parser.add_argument(
        "--deepcache",
        type=positive_int,
        default=None,
        metavar="N",
        help="recompute the U-Net's deep features only every N steps (DeepCache; 3 is about 2x faster "
        "sampling, slightly different images); unset or 1: off",
    )
    add_token_merging_option(parser)
    parser.add_argument(
        "--preview", type=Path, default=None, metavar="PNG", help="rewrite an approximate preview each step"
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the U-Net with torch.compile first (reports its time)"
    )


def add_token_merging_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-merging",
        type=finite_float,
        default=None,
        metavar="R",
        help="merge R (0-0.75) of the finest attention level's tokens before self-attention (ToMe; 0.5 "
        "is about 1.2x faster at 512 px, slightly different images); unset or 0: off",
    )


def run(args: argparse.Namespace) -> int:
    check_output(args)
    prompt, tags = take_prompt_loras(args)
    pipe = load_model(args)
    refiner = load_refiner(args)
    width, height = args.size or (None, None)
    if args.compile:
        compile_unet(pipe, width, height)
    seed = resolve_seed(args.seed)
    images = with_prompt_loras(
        pipe,
        tags,
        args.prompt,
        prompt,
        lambda: pipe.generate(
            prompt,
            width=width,
            height=height,
            cache_interval=deep_cache_interval(args),
            token_merging=args.token_merging,
            preview=None if args.preview is None else preview_writer(args.preview),
            variation_seed=args.variation_seed,
            variation_strength=args.variation_strength,
            refiner=refiner,
            refiner_switch=args.refiner_switch,
            **sampling_settings(args, seed),
        ),
    )
    save_images(args, images, [seed + i for i in range(len(images))])
    return 0


def deep_cache_interval(args: argparse.Namespace) -> int | None:
    """``--deepcache N``, else the fast configuration's interval under ``--fast`` (None: off). ``--fast``
    leaves ``--precision`` alone: its default is already "auto", and one given explicitly wins."""
    if args.deepcache is not None or not args.fast:
        return args.deepcache
    from latentdiffusion.pipelines.deepcache import FAST_CACHE_INTERVAL

    return FAST_CACHE_INTERVAL


def compile_unet(pipe, width: int | None, height: int | None) -> None:
    """torch.compile the U-Net and compile it now, at the image size, reporting the time on stderr."""
    from latentdiffusion.pipelines.precision import compile_unet as compile_in_place
    from latentdiffusion.pipelines.precision import warm_up

    compile_in_place(pipe.components)
    size = pipe.config.sample_size
    seconds = warm_up(pipe.components, width or size, height or size)
    print(f"compiled the U-Net in {seconds:.1f} s", file=sys.stderr)


def preview_writer(path: Path):
    """A preview callback that rewrites ``path`` with the first image's preview (at the image's size)."""
    from latentdiffusion.errors import UserError

    def write(step: int, steps: int, images: list) -> None:
        try:
            images[0].save(path, format="PNG")
        except OSError as error:
            raise UserError(f"cannot write the preview {path}: {error.strerror or error}") from None

    return write
