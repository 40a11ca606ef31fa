"""``ldm convert``: rewrite a model in another layout or precision (single file <-> diffusers <-> native)."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiffusion.checkpoints.formats import FORMATS

DTYPES = ("fp32", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=32)  # each help text states its own default


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert a model between the single-file, diffusers and native layouts",
        description="Read any model ldm can load and write it again. Every tensor is kept exactly, "
        "unless --dtype changes the precision.",
        formatter_class=formatter,
    )
    parser.add_argument("input", help="a .safetensors/.ckpt file, a diffusers folder or a saved model folder")
    parser.add_argument("output", type=Path, help="output file (.safetensors) or folder")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output layout (default: single-file for a .safetensors output, else native)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep)")
    parser.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="what the U-Net predicts, when the input cannot say (default: detect)",
    )
    parser.set_defaults(run=run)


def output_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return args.format
    return "single-file" if args.output.suffix == ".safetensors" else "native"


def run(args: argparse.Namespace) -> int:
    import torch

    import latentdiffusion as ld
    from latentdiffusion.checkpoints.formats import save_components

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    pipe = ld.load(args.input, dtype=dtype, prediction_type=args.prediction_type)
    format = output_format(args)
    refiner = None if pipe.refiner is None else (pipe.refiner.components, pipe.refiner_switch)
    save_components(pipe.components, args.output, format, dtype=dtype, refiner=refiner)
    print(f"{args.output} ({format}, {args.dtype or 'dtype kept'})")
    if refiner is not None and format != "native":
        print(f"note: the model's bundled refiner is not written: {format} has no place for it")
    return 0
