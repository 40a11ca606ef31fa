"""``ldm``: the command line. Each subcommand module adds its parser and runs by calling the library.

Heavy imports (torch, the networks) happen inside the subcommands, so ``ldm --help`` stays fast.

Errors are kept in two kinds on purpose. Input a user can fix (``INPUT_ERRORS``: a ``UserError`` from the
library, a file or folder that cannot be read or written, text that is not valid in its encoding, a bad
argument) is one line on stderr and exit status 2. Anything else is a bug in ``ldm``: it is not caught,
so Python prints its traceback and the exit status is 1 (``LDM_DEBUG=1`` shows tracebacks for both).
Warnings (a size rounded down, a sampled latent that is not finite) are one line each on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from latentdiffusion import __version__
from latentdiffusion.cli import (
    bench,
    convert,
    edit,
    eval_shapes,
    finetune,
    generate,
    merge,
    samplers,
    serve,
    shapes_pairs,
    train,
    train_embedding,
    train_motion,
    video,
)
from latentdiffusion.cli import train_controlnet as train_control
from latentdiffusion.errors import UserError

SUBCOMMANDS = (
    generate,
    samplers,
    edit,
    video,
    convert,
    merge,
    train,
    finetune,
    train_control,
    train_embedding,
    train_motion,
    eval_shapes,
    shapes_pairs,
    serve,
    bench,
)

# Errors that input causes, each reported as one line and exit status 2. OSError: a missing or unreadable
# file, a file where a folder belongs, no permission, a full or read-only disk. UnicodeError: a file or
# argument that is not valid text in its encoding. JSONDecodeError: a file that should be JSON and is not.
# Other exceptions (a plain ValueError included) are bugs and keep their traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError, UnicodeError, json.JSONDecodeError)


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr (with where to find help) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ldm",
        description="Latent diffusion (Stable Diffusion): generate images, train and convert models.",
    )
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn an input error (``INPUT_ERRORS``) into one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        with one_line_warnings(args.command):
            return args.run(args) or 0
    except INPUT_ERRORS as error:
        if os.environ.get("LDM_DEBUG"):
            raise
        print(f"ldm {args.command}: error: {describe(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130


def describe(error: BaseException) -> str:
    """The one-line message of an input error: a ``UserError``'s own text; for a file system error the
    system's reason and the path (``No space left on device: out.png``)."""
    if isinstance(error, UserError):
        return one_line(str(error))
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename is not None else ""
        return one_line(f"{error.strerror}{where}")
    if isinstance(error, json.JSONDecodeError):
        return f"a file is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    if isinstance(error, UnicodeDecodeError | UnicodeEncodeError):
        return one_line(f"text that is not valid {error.encoding} ({error.reason} at position {error.start})")
    return one_line(str(error) or type(error).__name__)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show each warning as ``ldm COMMAND: warning: MESSAGE``, without Python's file and source line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"ldm {command}: warning: {one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
