"""``ldm img2img``, ``ldm inpaint``, ``ldm outpaint``, ``ldm upscale``: image editing from the command line.

Each subcommand reads its images, calls the matching ``Pipeline`` method and writes numbered PNGs with
their settings, like ``ldm generate``. Warnings (a size rounded down, a mask resized) are printed as one
line each on stderr.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentdiffusion.cli.common import (
    add_model_option,
    add_output_options,
    add_refiner_switch_option,
    add_sampling_options,
    check_output,
    finite_float,
    formatter,
    load_model,
    positive_int,
    resolve_seed,
    sampling_settings,
    save_images,
)
from latentdiffusion.cli.generate import add_token_merging_option
from latentdiffusion.cli.prompt_loras import add_lora_dir_option, take_prompt_loras, with_prompt_loras

MASKED_CONTENT = ("original", "noise", "nothing")  # as pipelines.inpaint.MASKED_CONTENT (kept import-free)


def add_parser(commands: argparse._SubParsersAction) -> None:
    add_img2img(commands)
    add_inpaint(commands)
    add_outpaint(commands)
    add_upscale(commands)


def _common(parser: argparse.ArgumentParser, prompt_required: bool = True) -> None:
    if prompt_required:
        parser.add_argument("prompt", help="what the image should show")
    else:
        parser.add_argument("prompt", nargs="?", default="", help="what the image shows (optional)")
    parser.add_argument("--negative", default="", help="what the image should not show")
    add_model_option(parser)
    add_lora_dir_option(parser)
    add_sampling_options(parser)
    parser.add_argument("--num-images", type=positive_int, default=1, help="images to make")
    add_output_options(parser)


def add_img2img(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "img2img", help="redraw an image towards a prompt (SDEdit)", formatter_class=formatter
    )
    parser.add_argument("image", type=Path, help="input image")
    _common(parser)
    parser.add_argument(
        "--strength", type=finite_float, default=0.75, help="0 keeps the image, 1 replaces it entirely"
    )
    add_token_merging_option(parser)
    add_refiner_switch_option(parser)
    parser.set_defaults(run=run_img2img)


def add_mask_options(parser: argparse.ArgumentParser, strength: float) -> None:
    parser.add_argument("--strength", type=finite_float, default=strength, help="how much to change (0-1)")
    parser.add_argument("--mask-blur", type=finite_float, default=4.0, help="feather of the seam, pixels")
    parser.add_argument(
        "--masked-content",
        choices=MASKED_CONTENT,
        default="original",
        help="what the repainted area starts from when strength < 1",
    )
    parser.add_argument(
        "--no-paste-back",
        dest="paste_back",
        action="store_false",
        help="keep the model's output outside the mask instead of the exact input pixels",
    )
    add_token_merging_option(parser)


def add_inpaint(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inpaint", help="repaint the white part of a mask", formatter_class=formatter
    )
    parser.add_argument("image", type=Path, help="input image")
    parser.add_argument("mask", type=Path, help="mask image: white = repaint, black = keep")
    _common(parser)
    add_mask_options(parser, strength=1.0)
    parser.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    parser.add_argument(
        "--only-masked", action="store_true", help="work on a crop around the mask at the model's resolution"
    )
    parser.add_argument(
        "--padding", type=int, default=32, help="context pixels around the mask (--only-masked)"
    )
    parser.set_defaults(run=run_inpaint)


def add_outpaint(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "outpaint", help="extend an image beyond its borders", formatter_class=formatter
    )
    parser.add_argument("image", type=Path, help="input image")
    _common(parser)
    for side in ("left", "right", "top", "bottom"):
        parser.add_argument(
            f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (multiple of 8)"
        )
    add_mask_options(parser, strength=1.0)
    parser.set_defaults(run=run_outpaint)


def add_upscale(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "upscale", help="x4 super-resolution with an upscaler model", formatter_class=formatter
    )
    parser.add_argument("image", type=Path, help="low-resolution input image")
    _common(parser, prompt_required=False)
    parser.add_argument("--noise-level", type=int, default=20, help="augmentation noise added first (0-350)")
    parser.add_argument("--tile-size", type=int, default=128, help="tile side in input pixels; 0 = no tiles")
    parser.add_argument("--tile-overlap", type=int, default=32, help="tile overlap in input pixels")
    # The shipped upscaler (data/upscaler); unset sampling settings are the upscaler model's own.
    parser.set_defaults(run=run_upscale, model="upscaler")


def mask_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "strength": args.strength,
        "mask_blur": args.mask_blur,
        "masked_content": args.masked_content,
        "paste_back": args.paste_back,
        "token_merging": args.token_merging,
    }


def run_img2img(args: argparse.Namespace) -> int:
    return _run(
        args,
        lambda pipe, s: pipe.img2img(
            args.image,
            args.prompt,
            strength=args.strength,
            token_merging=args.token_merging,
            refiner_switch=args.refiner_switch,
            **s,
        ),
    )


def run_inpaint(args: argparse.Namespace) -> int:
    def call(pipe: Any, settings: dict[str, Any]) -> list:
        return pipe.inpaint(
            args.image,
            args.mask,
            args.prompt,
            invert_mask=args.invert_mask,
            only_masked=args.only_masked,
            padding=args.padding,
            **mask_settings(args),
            **settings,
        )

    return _run(args, call)


def run_outpaint(args: argparse.Namespace) -> int:
    sides = {"left": args.left, "right": args.right, "top": args.top, "bottom": args.bottom}
    return _run(
        args, lambda pipe, s: pipe.outpaint(args.image, args.prompt, **sides, **mask_settings(args), **s)
    )


def run_upscale(args: argparse.Namespace) -> int:
    def call(pipe: Any, settings: dict[str, Any]) -> list:
        return pipe.upscale(
            args.image,
            args.prompt,
            noise_level=args.noise_level,
            tile_size=args.tile_size or None,
            tile_overlap=args.tile_overlap,
            **settings,
        )

    return _run(args, call)


def _run(args: argparse.Namespace, call: Callable[[Any, dict[str, Any]], list]) -> int:
    check_output(args)
    sent = args.prompt
    args.prompt, tags = take_prompt_loras(args)  # ``call`` reads the prompt without its <lora:...> tags
    pipe = load_model(args)
    seed = resolve_seed(args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        settings = sampling_settings(args, seed)
        images = with_prompt_loras(pipe, tags, sent, args.prompt, lambda: call(pipe, settings))
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            print(f"ldm {args.command}: warning: {warning.message}", file=sys.stderr)
    save_images(args, images, [seed + i for i in range(len(images))])
    return 0
