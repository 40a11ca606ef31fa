"""``ldm merge`` (checkpoint merging, AUTOMATIC1111's methods and block weights) and ``ldm extract-lora``
(a LoRA file from the difference of a fine-tune and its base)."""

from __future__ import annotations

import argparse
from pathlib import Path

METHODS = ("weighted-sum", "add-difference")
DTYPES = ("fp32", "fp16", "bf16")


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=32)


def add_parser(commands: argparse._SubParsersAction) -> None:
    add_merge_parser(commands)


def add_merge_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge two or three checkpoints (weighted sum, add difference, block weights)",
        description="Merge single-file .safetensors checkpoints of one family tensor by tensor: "
        "weighted-sum makes (1 - alpha) A + alpha B, add-difference makes A + alpha (B - C). "
        "The output has A's keys and, unless --dtype says otherwise, A's dtypes.",
        formatter_class=formatter,
    )
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="A B (weighted-sum) or A B C (add-difference)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--method", choices=METHODS, default=None, help="default: by the number of models")
    parser.add_argument("--alpha", type=float, default=0.5, help="the ratio a (default: 0.5)")
    parser.add_argument(
        "--block-weights",
        default=None,
        metavar="W,W,...",
        help="a ratio per U-Net block instead of alpha: IN00..IN11,M00,OUT00..OUT11 (SD 1.x/2.x, 25 values) "
        "or IN00..IN08,M00,OUT00..OUT08 (SDXL, 19), optionally with BASE (text encoders, VAE, "
        "time embedding) first",
    )
    parser.add_argument("--keep-text-encoder", action="store_true", help="copy A's text encoder(s) unchanged")
    parser.add_argument("--keep-vae", action="store_true", help="copy A's autoencoder unchanged")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="output precision (default: A's)")
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from latentdiffusion.checkpoints.merge import merge
    from latentdiffusion.errors import UserError

    if len(args.models) not in (2, 3):
        raise UserError(f"give two models (A B) or three (A B C), not {len(args.models)}")
    method = args.method or ("weighted-sum" if len(args.models) == 2 else "add-difference")
    out = merge(
        *args.models,
        method=method,
        alpha=args.alpha,
        block_weights=args.block_weights,
        output=args.output,
        dtype=args.dtype,
        keep_text_encoder=args.keep_text_encoder,
        keep_vae=args.keep_vae,
    )
    print(f"{out} ({method}, alpha {args.alpha}{', block weights' if args.block_weights else ''})")
    return 0
