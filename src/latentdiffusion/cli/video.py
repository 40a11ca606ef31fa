"""``ldm video``: video from the command line, in two forms.

- ``ldm video walk "prompt A" "prompt B" ... --frames N --seeds 1,2 -o walk.mp4``: a latent walk
  (``Pipeline.walk``) written as MP4, WebM, GIF or APNG (``pipelines.video_io``), optionally with every
  frame as a PNG with its settings (``--frames-dir``).
- ``ldm video animate "prompt" --motion-module FILE --frames 16``, also written ``ldm video "prompt"
  ...``: text-to-video with a motion module, the subcommand of ``latentdiffusion.cli.animate``
  (``add_arguments(parser)`` and ``run(args) -> int``); without that module it says so.

A first word that is not a form's name is a prompt for ``animate`` (``VideoForms``); options follow the
form's name or the prompt.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from latentdiffusion.cli.common import (
    add_model_option,
    add_sampling_options,
    formatter,
    image_size,
    load_model,
    positive_int,
    resolve_seed,
    sampling_settings,
    seed_number,
    writable_folder,
)
from latentdiffusion.errors import UserError

DEFAULT_FORM = "animate"


class VideoForms(argparse._SubParsersAction):
    """The forms of ``ldm video`` (walk, animate), where any other first word begins ``animate``'s
    arguments: ``ldm video PROMPT ...`` is ``ldm video animate PROMPT ...``."""

    class AnyWord(dict):
        """The forms by name, as argparse's choices: every word is accepted (it may be a prompt)."""

        def __contains__(self, word: object) -> bool:
            return True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.choices = self.AnyWord(self._name_parser_map)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values[0] not in self._name_parser_map:
            values = [DEFAULT_FORM, *values]
        super().__call__(parser, namespace, values, option_string)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "video",
        help="make videos: latent walks between prompts, text-to-video with a motion module",
        description="ldm video walk PROMPT PROMPT ... -o walk.mp4: a latent walk. ldm video [animate] PROMPT "
        "--motion-module FILE: text-to-video (AnimateDiff). See `ldm video FORM --help`.",
        formatter_class=formatter,
    )
    forms = parser.add_subparsers(
        dest="form", metavar="{walk,animate}", required=True, action=VideoForms, title="forms"
    )
    add_walk(forms)
    add_animate(forms)


def add_animate(forms: argparse._SubParsersAction) -> None:
    """``animate``: the text-to-video subcommand of ``latentdiffusion.cli.animate`` if it is installed."""
    try:
        animate = importlib.import_module("latentdiffusion.cli.animate")
    except ModuleNotFoundError as error:
        if error.name != "latentdiffusion.cli.animate":
            raise
        animate = None
    help_text = "text-to-video with a motion module (AnimateDiff); also `ldm video PROMPT ...`"
    parser = forms.add_parser("animate", help=help_text, formatter_class=formatter)
    if animate is None:
        parser.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(run=run_missing_animate)
        return
    animate.add_arguments(parser)
    parser.set_defaults(run=animate.run)


def run_missing_animate(args: argparse.Namespace) -> int:
    raise UserError("text-to-video (ldm video animate) is not part of this installation; ldm video walk is")


def seed_list(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]: one seed per keyframe (or one for all)."""
    try:
        return [seed_number(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"expected seeds separated by commas such as 1,2: {error}") from None


def add_walk(forms: argparse._SubParsersAction) -> None:
    parser = forms.add_parser(
        "walk",
        help="a latent walk: frames between prompts (and seeds), written as a video",
        description="Frames that move from each (prompt, seed) keyframe to the next: the text conditioning "
        "interpolated linearly, the starting noise spherically; the keyframes' frames are the stills "
        "`ldm generate` makes with the same prompt, seed and options.",
        formatter_class=formatter,
    )
    parser.add_argument(
        "prompts", nargs="+", metavar="PROMPT", help="keyframe prompts (one serves all seeds)"
    )
    parser.add_argument("--negative", default="", help="what no frame should show")
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        metavar="S1,S2,...",
        help="one seed per keyframe, or one for all (default: --seed for all)",
    )
    parser.add_argument(
        "--frames", type=positive_int, default=12, help="frames from each keyframe to the next"
    )
    add_model_option(parser)
    add_sampling_options(parser)
    parser.add_argument("--size", type=image_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="the video: .mp4, .webm, .gif or .apng (.png)"
    )
    parser.add_argument("--fps", type=positive_float, default=12.0, help="frames per second")
    parser.add_argument(
        "--scale", type=positive_int, default=1, help="enlarge the video's frames N times (nearest neighbour)"
    )
    parser.add_argument(
        "--frames-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each frame as DIR/00000.png, ...",
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_walk, num_images=1)


def positive_float(text: str) -> float:
    from latentdiffusion.cli.common import finite_float

    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def check_walk_outputs(args: argparse.Namespace) -> None:
    """Refuse an unknown video suffix, a missing encoder and unwritable places before any work."""
    from latentdiffusion.pipelines.video_io import ENCODERS, import_av, video_format

    if args.output.is_dir():
        raise UserError(f"-o {args.output} is a folder; give a file name such as {args.output / 'walk.mp4'}")
    if video_format(args.output) in ENCODERS:
        import_av()
    writable_folder(args.output.parent, f"-o {args.output}")
    if args.frames_dir is not None:
        if args.frames_dir.exists() and not args.frames_dir.is_dir():
            raise UserError(f"--frames-dir {args.frames_dir} is a file, not a folder")
        writable_folder(args.frames_dir, f"--frames-dir {args.frames_dir}")


def run_walk(args: argparse.Namespace) -> int:
    from latentdiffusion.pipelines.video_io import write_video

    check_walk_outputs(args)
    if args.seeds is not None and args.seed != -1:
        raise UserError("give --seeds (one per keyframe) or --seed (one for all), not both")
    seeds = args.seeds if args.seeds is not None else [resolve_seed(args.seed)]
    pipe = load_model(args)
    width, height = args.size or (None, None)
    options = sampling_settings(args, seeds[0])
    del options["seed"], options["num_images"]
    frames = pipe.walk(
        args.prompts if len(args.prompts) > 1 else args.prompts[0],
        seeds=seeds if len(seeds) > 1 else seeds[0],
        frames=args.frames,
        width=width,
        height=height,
        on_frame=None if args.frames_dir is None else frame_writer(args.frames_dir),
        **options,
    )
    write_video(frames, args.output, args.fps, scale=args.scale)
    report_changes(frames)
    print(args.output)
    return 0


def frame_writer(folder: Path):
    """An ``on_frame`` callback that writes frame i as ``folder/0000i.png`` with its PNG info."""
    from latentdiffusion.pipelines.metadata import save_png

    def write(i: int, frame) -> None:
        path = folder / f"{i:05d}.png"
        try:
            save_png(frame, path, frame.info.get("parameters"))
        except OSError as error:
            raise UserError(f"cannot write {path}: {error.strerror or error}") from None

    return write


def report_changes(frames: list) -> None:
    """The walk's frame count and frame-to-frame change (mean absolute, 8-bit units) on stderr."""
    import numpy as np

    from latentdiffusion.pipelines.walk import frame_changes

    changes = frame_changes(frames)
    median, largest = float(np.median(changes)), max(changes)
    ratio = f"{largest / median:.1f}x the median" if median > 0 else "the median is 0"
    print(
        f"{len(frames)} frames; change per frame: mean {np.mean(changes):.2f}, median {median:.2f}, "
        f"max {largest:.2f} ({ratio})",
        file=sys.stderr,
    )
