"""``ldm``: the command line. Each subcommand module adds its parser and runs by calling the library.

Heavy imports (torch, the networks) happen inside the subcommands, so ``ldm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from latentdiffusion import __version__
from latentdiffusion.cli import bench, convert, edit, eval_shapes, finetune, generate, samplers, serve, train
from latentdiffusion.errors import UserError

SUBCOMMANDS = (generate, samplers, edit, convert, train, finetune, eval_shapes, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm",
        description="Latent diffusion (Stable Diffusion): generate images, train and convert models.",
    )
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn a ``UserError`` into one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as error:
        if os.environ.get("LDM_DEBUG"):
            raise
        print(f"ldm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
