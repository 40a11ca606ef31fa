"""Argument types and options shared by several subcommands."""

from __future__ import annotations

import argparse
import math


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


PRECISIONS = ("fp32", "bf16", "auto")  # as pipelines.precision.PRECISIONS (kept import-free)


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="number format of the U-Net and autoencoder: bf16 (the CPU fast path: bfloat16 weights, "
        "packed for oneDNN), fp32 (the reference), auto (bf16 on a CPU with native bfloat16, else fp32)",
    )


def add_model_option(parser: argparse.ArgumentParser) -> None:
    add_precision_option(parser)
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the shipped model), a .safetensors/.ckpt file, a model folder, or preset:NAME "
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
        help="merge a LoRA file (kohya/A1111 or diffusers format) with a strength (default 1); repeatable",
    )


def load_model(args: argparse.Namespace):
    """The pipeline that ``add_model_option``'s options (and ``--device``) describe."""
    import latentdiffusion as ld

    return ld.load(
        args.model,
        device=args.device,
        prediction_type=getattr(args, "prediction_type", None),
        loras=getattr(args, "lora", []),
        precision=args.precision,
    )


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
