"""Argument types and options shared by several subcommands."""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentdiffusion.errors import UserError

if TYPE_CHECKING:  # the command line stays light: torch is imported only to run a command
    from latentdiffusion.families import MicroConditioning


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if "(default:" in help_text else super()._get_help_string(action)


def formatter(prog: str) -> argparse.HelpFormatter:
    return _DefaultsFormatter(prog, max_help_position=32)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def restart_spec(text: str) -> tuple[int, int]:
    """``--restart``'s STEPS or STEPSxTIMES (``6``, ``6x2``); the ranges are checked with the steps."""
    steps, cross, times = text.lower().partition("x")
    try:
        return (int(steps), int(times) if cross else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected STEPS or STEPSxTIMES (e.g. 6 or 6x2), got {text!r}"
        ) from None


MAX_SEED = 2**63 - 1  # as pipelines.request.MAX_SEED (kept import-free)


def seed_number(text: str) -> int:
    """A whole number from 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {MAX_SEED} (2**63 - 1), got {text}")
    return value


def seed_or_random(text: str) -> int:
    """``seed_number``, or -1 for a random one."""
    return -1 if text.strip() == "-1" else seed_number(text)


def image_size(text: str) -> tuple[int, int]:
    """``512x768`` (width x height) or ``512`` (square)."""
    parts = text.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512, got {text!r}")
    return (numbers[0], numbers[-1])


PRECISIONS = ("fp32", "fp32-fast", "bf16", "auto")  # as pipelines.precision.PRECISIONS (kept import-free)


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="number format of the U-Net and autoencoder: bf16 (the CPU fast path: bfloat16 weights, "
        "packed for oneDNN), fp32-fast (float32 on weights packed for oneDNN), fp32 (the reference), auto "
        "(bf16 on a CPU with native bfloat16, fp32-fast on other CPUs, fp32 elsewhere)",
    )


BACKENDS = ("torch", "openvino", "auto")  # as backends.BACKENDS (kept import-free)


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="where the U-Net runs: torch (the default), openvino (converted per image size and cached on "
        "disk; needs pip install 'latentdiffusion[openvino]'), auto (openvino only where measured faster: "
        "see docs/benchmarks.md; the default under --fast)",
    )


def chosen_backend(args: argparse.Namespace) -> str:
    """``--backend``, else "auto" under ``--fast`` (the measured fast configuration) and "torch" otherwise."""
    given = getattr(args, "backend", None)
    if given is not None:
        return given
    return "auto" if getattr(args, "fast", False) else "torch"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    add_precision_option(parser)
    add_backend_option(parser)
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the shipped model), 'default-few-step' (its 4-step student), a .safetensors/.ckpt "
        "file, a model folder, or preset:NAME "
        "(random weights of a named architecture)",
    )
    parser.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="what the model's U-Net predicts, for checkpoints that cannot say; unset: the model's own "
        "setting, or detected",
    )
    parser.add_argument(
        "--lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="merge a LoRA file (kohya/A1111 or diffusers format; LyCORIS LoCon/LoHa/LoKr/full/DoRA too) "
        "with a strength (default 1); repeatable",
    )
    parser.add_argument(
        "--embeddings-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="textual-inversion embeddings (.pt/.safetensors/.bin): each file's name becomes a prompt word",
    )
    parser.add_argument(
        "--no-t5",
        dest="t5",
        action="store_false",
        default=None,
        help="SD3: run without the T5-XXL text encoder (its weights are not read: saves about 9 GB in bf16; "
        "zeros take its place, as the reference pipeline allows)",
    )
    parser.add_argument(
        "--vae",
        nargs=2,
        metavar=("tiny", "PATH"),
        default=None,
        help="'tiny PATH': decode, encode and preview with a tiny autoencoder (TAESD: a taesd_decoder "
        ".safetensors/.pth file, its encoder found beside it, or a diffusers AutoencoderTiny folder) instead "
        "of the model's own: far faster on a CPU, a little less detail",
    )


def load_model(args: argparse.Namespace, source: str | None = None, *, loras: bool = True):
    """The pipeline that ``add_model_option``'s options (and ``--device``) describe; ``source`` loads
    another model (a refiner) the same way, ``loras=False`` without the LoRA files."""
    import latentdiffusion as ld

    pipe = ld.load(
        args.model if source is None else source,
        device=args.device,
        prediction_type=getattr(args, "prediction_type", None),
        loras=getattr(args, "lora", []) if loras else [],
        precision=args.precision,
        t5=getattr(args, "t5", None),
        tiny_vae=tiny_vae_path(getattr(args, "vae", None)) if source is None else None,
        backend=chosen_backend(args),
    )
    if loras and getattr(args, "embeddings_dir", None) is not None:
        pipe.load_embeddings(args.embeddings_dir)
    return pipe


def tiny_vae_path(vae: list[str] | None) -> str | None:
    """``--vae tiny PATH`` -> PATH (None when the option is not given)."""
    if vae is None:
        return None
    kind, path = vae
    if kind != "tiny":
        raise UserError(f"--vae takes 'tiny PATH' (a TAESD file or AutoencoderTiny folder), got {kind!r}")
    return path


def lora_spec(text: str) -> tuple[str, float]:
    """``file.safetensors:0.8`` -> (file, 0.8); without a numeric suffix the strength is 1."""
    path, _, suffix = text.rpartition(":")
    try:
        strength = float(suffix) if path else None
    except ValueError:
        strength = None
    if strength is None:
        return text, 1.0
    if not math.isfinite(strength):
        raise argparse.ArgumentTypeError(f"expected a finite LoRA strength, got {suffix!r}")
    return path, strength


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of every image-making subcommand (``Pipeline``'s common options)."""
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
        help="noise-level discretisation: karras or exponential, or a timestep spacing: leading, trailing "
        "or linspace, or ComfyUI's sgm_uniform, beta, linear_quadratic, kl_optimal (default: the model's)",
    )
    parser.add_argument(
        "--cfg",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale, 1 = no unconditional pass (default: the model's, 7.5 for SD)",
    )
    parser.add_argument("--cfg-rescale", type=finite_float, default=0.0, help="guidance rescale (0 = off)")
    parser.add_argument(
        "--restart",
        type=restart_spec,
        default=(0, 1),
        metavar="STEPS[xTIMES]",
        help="restart sampling (Xu et al. 2023): before the last step, noise the latent back to the level "
        "STEPS steps earlier and run those steps again, TIMES times (default 1); 0 = off",
    )
    parser.add_argument(
        "--eps-scaling",
        type=finite_float,
        default=None,
        metavar="F",
        help="epsilon scaling (Ning et al. 2024): divide the guided noise estimate by F at every step, "
        "0.5..1.5; 1 = off (default: the model's, 1 for SD)",
    )
    parser.add_argument(
        "--eta",
        type=finite_float,
        default=None,
        help="ddim noise (0 = deterministic); tcd: its gamma, 0..1 (default 0.3)",
    )
    parser.add_argument(
        "--fractional-timesteps",
        action="store_true",
        help="feed the network fractional timesteps off the training grid (karras/exponential sigmas), as "
        "diffusers' Euler schedulers and AUTOMATIC1111 do, instead of the nearest whole one",
    )
    parser.add_argument(
        "--seed", type=seed_or_random, default=-1, help="seed of the first image; -1 picks one at random"
    )
    add_conditioning_options(parser)
    add_control_options(parser)
    add_skip_layer_options(parser)


def block_indices(text: str) -> tuple[int, ...]:
    """``7,8,9`` -> (7, 8, 9): block indices >= 0."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected block indices >= 0 separated by commas such as 7,8,9, got {text!r}"
        )
    return tuple(int(part) for part in parts)


def add_skip_layer_options(parser: argparse.ArgumentParser) -> None:
    """Skip-layer guidance (``ld.SkipLayerGuidance``): on when ``--slg-layers`` is given."""
    group = parser.add_argument_group("skip-layer guidance (SD3; SD3.5 Medium: --slg-layers 7,8,9)")
    group.add_argument(
        "--slg-layers",
        type=block_indices,
        default=None,
        metavar="I,J,...",
        help="transformer blocks to leave out of the extra conditional pass (default: off)",
    )
    group.add_argument("--slg-scale", type=finite_float, default=None, help="its scale (default: 2.8)")
    group.add_argument(
        "--slg-start",
        type=finite_float,
        default=None,
        help="fraction of the steps it starts after (default: 0.01)",
    )
    group.add_argument(
        "--slg-stop",
        type=finite_float,
        default=None,
        help="fraction of the steps it stops before (default: 0.2)",
    )


SLG_OPTIONS = {"scale": "--slg-scale", "start": "--slg-start", "stop": "--slg-stop"}


def skip_layer_settings(args: argparse.Namespace) -> Any:
    """The ``skip_layer_guidance=`` of the skip-layer options (None when ``--slg-layers`` is not given)."""
    given = {name: getattr(args, f"slg_{name}", None) for name in SLG_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    layers = getattr(args, "slg_layers", None)
    if layers is None:
        if given:
            raise UserError(f"{SLG_OPTIONS[next(iter(given))]} needs --slg-layers (the blocks to leave out)")
        return None
    import latentdiffusion as ld

    return ld.SkipLayerGuidance(layers=layers, **given)


def add_control_options(parser: argparse.ArgumentParser) -> None:
    """ControlNet units (``ld.Control``): ``--control`` once per unit; each of the other options is given
    once (for every unit) or once per unit, in order."""
    group = parser.add_argument_group("ControlNet")
    group.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="MODEL:IMAGE[:STRENGTH]",
        help="a ControlNet (diffusers folder or single file), its hint image and strength (default 1)",
    )
    group.add_argument(
        "--control-preprocessor",
        action="append",
        default=[],
        help="none (the image is the hint map: depth, pose, normal maps must be supplied so), canny, "
        "softedge_sobel, scribble_xdog, lineart_standard, shuffle, tile_resample, blur_gaussian, invert, "
        "seg_shapes, inpaint (editing commands; uses the mask)",
    )
    group.add_argument("--control-start", action="append", type=finite_float, default=[], help="0..1 (0)")
    group.add_argument("--control-end", action="append", type=finite_float, default=[], help="0..1 (1)")
    group.add_argument(
        "--control-mode",
        action="append",
        default=[],
        help="balanced (default), prompt ('My prompt is more important') or controlnet ('ControlNet is more "
        "important'), as the A1111 ControlNet extension; its full names and 0/1/2 work too",
    )
    group.add_argument(
        "--control-resize-mode",
        action="append",
        default=[],
        help="how the hint is fitted to the output: crop ('Crop and Resize', default), resize ('Just "
        "Resize') or fill ('Resize and Fill'); full names and 0/1/2 work too",
    )


def control_settings(args: argparse.Namespace) -> list | None:
    """The ``control=`` units of the ControlNet options (None when there are none)."""
    specs = getattr(args, "control", [])
    if not specs:
        return None
    import latentdiffusion as ld

    per_unit = {
        "preprocessor": _per_unit(args.control_preprocessor, len(specs), "--control-preprocessor"),
        "start": _per_unit(args.control_start, len(specs), "--control-start"),
        "end": _per_unit(args.control_end, len(specs), "--control-end"),
        "control_mode": _per_unit(args.control_mode, len(specs), "--control-mode"),
        "resize_mode": _per_unit(args.control_resize_mode, len(specs), "--control-resize-mode"),
    }
    units = []
    for i, spec in enumerate(specs):
        model, image, strength = _control_spec(spec)
        given = {name: values[i] for name, values in per_unit.items() if values is not None}
        if given.get("preprocessor") == "none":
            given["preprocessor"] = None
        units.append(ld.Control(model, image, strength=strength, **given))
    return units


def _per_unit(values: list, units: int, flag: str) -> list | None:
    if not values:
        return None
    if len(values) == 1:
        return values * units
    if len(values) != units:
        raise UserError(
            f"{flag} is given {len(values)} times for {units} --control units: give it once or once each"
        )
    return values


def _control_spec(spec: str) -> tuple[str, str, float]:
    """``MODEL:IMAGE[:STRENGTH]`` -> (model, image, strength); the last part is a strength when it is a
    number and two parts remain before it."""
    head, _, last = spec.rpartition(":")
    try:
        strength = float(last)
    except ValueError:
        strength = None
    if strength is None or ":" not in head:
        head, strength = spec, 1.0
    model, sep, image = head.rpartition(":")
    if not sep or not model or not image:
        raise UserError(f"--control takes MODEL:IMAGE[:STRENGTH], got {spec!r}")
    return model, image, strength


def size_pair(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (height, width), the order of ``MicroConditioning``'s sizes."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x768, got {text!r}")
    return int(height), int(width)


MICRO_OPTIONS = {  # flag -> (MicroConditioning field, type, help)
    "--original-size": ("original_size", size_pair, "SDXL: the size (WxH) the image claims to come from"),
    "--target-size": ("target_size", size_pair, "SDXL: the size (WxH) the image claims to be made for"),
    "--crop-top": ("crop_top", int, "SDXL: the crop offset from the top the image claims (pixels)"),
    "--crop-left": ("crop_left", int, "SDXL: the crop offset from the left the image claims (pixels)"),
    "--negative-original-size": ("negative_original_size", size_pair, "the same for the negative side"),
    "--negative-target-size": ("negative_target_size", size_pair, "the same for the negative side"),
    "--negative-crop-top": ("negative_crop_top", int, "the same for the negative side"),
    "--negative-crop-left": ("negative_crop_left", int, "the same for the negative side"),
    "--aesthetic-score": ("aesthetic_score", finite_float, "SDXL refiner: the aesthetic score (default 6)"),
    "--negative-aesthetic-score": ("negative_aesthetic_score", finite_float, "the same, negative (2.5)"),
}


def add_conditioning_options(parser: argparse.ArgumentParser) -> None:
    """SDXL's size, crop and aesthetic-score conditioning (``families.MicroConditioning``); unset sizes
    are the image being made, and negative values default to the positive ones."""
    group = parser.add_argument_group("SDXL conditioning (other models ignore it)")
    for flag, (dest, kind, text) in MICRO_OPTIONS.items():
        group.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def conditioning_settings(args: argparse.Namespace) -> MicroConditioning | None:
    """The ``conditioning=`` of the given conditioning options (None when none is given)."""
    from latentdiffusion.families import MicroConditioning

    given = {dest: getattr(args, dest) for dest, _, _ in MICRO_OPTIONS.values()}
    if all(value is None for value in given.values()):
        return None
    fields = {k: v for k, v in given.items() if v is not None and "crop_" not in k}
    for side in ("", "negative_"):
        top, left = given[f"{side}crop_top"], given[f"{side}crop_left"]
        if top is not None or left is not None:
            fields[f"{side}crops_coords_top_left"] = (top or 0, left or 0)
    return MicroConditioning(**fields)


def sampling_settings(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """``add_sampling_options``' options (and the prompts, image count, progress bar) as ``Pipeline``
    keyword arguments."""
    return {
        "negative_prompt": args.negative,
        "steps": args.steps,
        "guidance_scale": args.cfg,
        "guidance_rescale": args.cfg_rescale,
        "restart": args.restart,
        "eps_scaling": args.eps_scaling,
        "sampler": args.sampler,
        "sigmas": args.sigmas,
        "eta": args.eta,
        "round_timesteps": not args.fractional_timesteps,
        "conditioning": conditioning_settings(args),
        "control": control_settings(args),
        "skip_layer_guidance": skip_layer_settings(args),
        "seed": seed,
        "num_images": args.num_images,
        "progress": not args.quiet and sys.stderr.isatty(),
    }


def add_output_options(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("-o", "--output", type=Path, default=None, help="output PNG path")
    output.add_argument("--outdir", type=Path, default=Path("outputs"), help="folder for numbered PNGs")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_seed(seed: int) -> int:
    return random.randrange(2**32) if seed < 0 else seed


def check_output(args: argparse.Namespace) -> None:
    """Refuse ``-o``/``--outdir`` problems (a folder that is a file, no write permission, a read-only
    disk) before any model is loaded or image made."""
    from latentdiffusion.errors import UserError

    if args.output is not None:
        if args.output.is_dir():
            raise UserError(
                f"-o {args.output} is a folder; give a file name such as {args.output / 'out.png'}"
            )
        writable_folder(args.output.parent, f"-o {args.output}")
    else:
        writable_folder(args.outdir, f"--outdir {args.outdir}")


def writable_folder(folder: Path, what: str) -> None:
    """Check that files can be written in ``folder``, or in the nearest folder above it that exists (where
    it would be created), by writing a probe file there; a ``UserError`` naming ``what`` otherwise."""
    import tempfile

    from latentdiffusion.errors import UserError

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what}: cannot write in {existing}: it is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".ldm-probe-"):
            pass
    except OSError as error:
        raise UserError(f"{what}: cannot write in {existing}: {error.strerror or error}") from None


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


def save_images(args: argparse.Namespace, images: list, seeds: list[int]) -> None:
    """Write each image with its settings (PNG info) to its ``output_paths`` path and print the path."""
    from latentdiffusion.errors import UserError
    from latentdiffusion.pipelines.metadata import save_png

    for image, path in zip(images, output_paths(args, seeds), strict=True):
        try:
            save_png(image, path, image.info.get("parameters"))
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None
        print(path)


def add_refiner_options(parser: argparse.ArgumentParser) -> None:
    """--refiner MODEL and --refiner-switch: a second model finishes each image (``Pipeline.generate``)."""
    parser.add_argument(
        "--refiner",
        default=None,
        metavar="MODEL",
        help="a second model (the SDXL refiner, or a low-noise expert) that finishes each image from "
        "--refiner-switch on",
    )
    add_refiner_switch_option(parser)


def add_refiner_switch_option(parser: argparse.ArgumentParser) -> None:
    """--refiner-switch: where the refiner (given or bundled with the model) takes over."""
    parser.add_argument(
        "--refiner-switch",
        type=finite_float,
        default=None,
        help="part of the schedule (0..1) the model runs before the refiner takes over the latent "
        "(default: 0.8 for --refiner, the model's own for a refiner bundled with it; 1: the model alone)",
    )


def load_refiner(args: argparse.Namespace):
    """The pipeline ``--refiner`` names (loaded as ``load_model`` loads the model, without its LoRA
    files), or None."""
    return load_model(args, args.refiner, loras=False) if args.refiner is not None else None
