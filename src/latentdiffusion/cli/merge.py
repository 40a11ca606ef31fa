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
    add_extract_parser(commands)


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


def add_extract_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "extract-lora",
        help="make a LoRA file from a fine-tuned model and its base (truncated SVD)",
        description="Write the kohya-format LoRA that best turns BASE into TUNED at the given rank: the "
        "truncated SVD of each layer's weight difference (U-Net and text encoders). Single-file "
        ".safetensors models are read one tensor at a time and the output is streamed, so memory stays "
        "near one layer's; other models are loaded whole.",
        formatter_class=formatter,
    )
    parser.add_argument("tuned", help="the fine-tuned model (any model ldm can load)")
    parser.add_argument("base", help="the model it was fine-tuned from")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--rank", type=int, default=16, help="rank of linear and 1x1 layers (default: 16)")
    parser.add_argument(
        "--conv-rank",
        type=int,
        default=None,
        help="rank of 3x3 convolutions, LoCon-style; 0 leaves the ResBlocks out (default: --rank)",
    )
    parser.add_argument(
        "--clamp-quantile",
        type=float,
        default=None,
        help="clip outlying factor entries (kohya: 0.99; default: off)",
    )
    parser.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="fp16", help="precision of the file (default: fp16)"
    )
    parser.set_defaults(run=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from latentdiffusion.checkpoints.lora_extract import extract_lora

    out = extract_lora(
        args.tuned,
        args.base,
        rank=args.rank,
        output=args.output,
        conv_rank=args.conv_rank,
        clamp_quantile=args.clamp_quantile,
        text_encoders=not args.unet_only,
        dtype=args.dtype,
        progress=True,
    )
    print(f"{out} (rank {args.rank})")
    return 0
