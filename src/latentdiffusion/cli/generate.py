"""``ldm generate``: text-to-image from the command line."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from latentdiffusion.cli.common import (
    add_model_option,
    finite_float,
    formatter,
    image_size,
    load_model,
    positive_int,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="make images from a text prompt", formatter_class=formatter)
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument("--negative", default="", help="what the image should not show")
    add_model_option(parser)
    add_sampling_options(parser)
    parser.add_argument("--size", type=image_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--num-images", type=positive_int, default=1, help="images to make")
    parser.add_argument(
        "--variation-seed", type=int, default=None, help="seed whose noise each image moves towards"
    )
    parser.add_argument(
        "--variation-strength",
        type=finite_float,
        default=0.0,
        help="how far towards the variation seed's noise, 0..1 (0.1-0.3: variations of the same picture)",
    )
    add_speed_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=run)


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--deepcache",
        type=positive_int,
        default=None,
        metavar="N",
        help="recompute the U-Net's deep features only every N steps (DeepCache; 3 is about 2x faster "
        "sampling, slightly different images); unset or 1: off",
    )
    parser.add_argument(
        "--preview", type=Path, default=None, metavar="PNG", help="rewrite an approximate preview each step"
    )
    parser.add_argument(
        "--compile", action="store_true", help="compile the U-Net with torch.compile first (reports its time)"
    )


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps (default: the model's, 20 for SD)"
    )
    parser.add_argument(
        "--sampler",
        default=None,
        help="sampler name, see `ldm samplers` (default: the model's, dpmpp_2m for SD)",
    )
    parser.add_argument(
        "--sigmas",
        default=None,
        help="noise-level discretisation: karras or exponential (default: the model's)",
    )
    parser.add_argument(
        "--cfg",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale (default: the model's, 7.5 for SD)",
    )
    parser.add_argument("--cfg-rescale", type=finite_float, default=0.0, help="guidance rescale (0 = off)")
    parser.add_argument("--eta", type=finite_float, default=None, help="ddim noise (0 = deterministic)")
    parser.add_argument(
        "--seed", type=int, default=-1, help="seed of the first image; -1 picks one at random"
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("-o", "--output", type=Path, default=None, help="output PNG path")
    output.add_argument("--outdir", type=Path, default=Path("outputs"), help="folder for numbered PNGs")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_seed(seed: int) -> int:
    return random.randrange(2**32) if seed < 0 else seed


def output_paths(args: argparse.Namespace, seeds: list[int]) -> list[Path]:
    """``-o out.png`` -> out.png (or out-0.png, out-1.png, ...); ``--outdir D`` -> D/00000-SEED.png, ..."""
    if args.output is not None:
        if len(seeds) == 1:
            return [args.output]
        return [
            args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}") for i in range(len(seeds))
        ]
    start = next_index(args.outdir)
    return [args.outdir / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def next_index(folder: Path) -> int:
    numbers = (
        [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] if folder.is_dir() else []
    )
    return max(numbers, default=-1) + 1


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.errors import UserError
    from latentdiffusion.pipelines.metadata import save_png

    pipe = load_model(args)
    width, height = args.size or (None, None)
    if args.compile:
        compile_unet(pipe, width, height)
    seed = resolve_seed(args.seed)
    images = pipe.generate(
        args.prompt,
        negative_prompt=args.negative,
        width=width,
        height=height,
        steps=args.steps,
        guidance_scale=args.cfg,
        guidance_rescale=args.cfg_rescale,
        sampler=args.sampler,
        sigmas=args.sigmas,
        eta=args.eta,
        seed=seed,
        num_images=args.num_images,
        progress=not args.quiet and sys.stderr.isatty(),
        cache_interval=args.deepcache,
        preview=None if args.preview is None else preview_writer(args.preview),
        variation_seed=args.variation_seed,
        variation_strength=args.variation_strength,
    )
    paths = output_paths(args, [seed + i for i in range(len(images))])
    for image, path in zip(images, paths, strict=True):
        try:
            save_png(image, path, image.info.get("parameters"))
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None
        print(path)
    return 0


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
