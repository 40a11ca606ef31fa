"""``ldm video animate "prompt" --motion-module FILE`` (also ``ldm video "prompt" ...``): text-to-video with
AnimateDiff motion modules (``Pipeline.animate``), written as MP4, WebM, GIF or APNG
(``pipelines.video_io``). On the default model ``--motion-module`` may be left out: the module shipped
for it is used. ``latentdiffusion.cli.video`` adds this form to ``ldm video``."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiffusion.cli.common import (
    add_model_option,
    add_sampling_options,
    image_size,
    load_model,
    lora_spec,
    positive_int,
    resolve_seed,
    sampling_settings,
)
from latentdiffusion.errors import UserError


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "A clip from a prompt: an SD 1.5 model's U-Net with AnimateDiff motion modules (original v1/v2/v3 "
        ".ckpt/.safetensors files or a diffusers MotionAdapter folder; the default model has its own, used "
        "when --motion-module is left out). Clips longer than --context frames are denoised in sliding "
        "windows."
    )
    parser.add_argument("prompt", help="what the clip shows")
    parser.add_argument("--negative", default="", help="what no frame should show")
    parser.add_argument(
        "--motion-module",
        type=Path,
        default=None,
        metavar="FILE",
        help="the motion module (file or folder); 'default', also when left out on the default model: the "
        "module shipped for the default model",
    )
    parser.add_argument(
        "--motion-lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="merge an AnimateDiff motion LoRA with a strength (default 1); repeatable",
    )
    parser.add_argument(
        "--first-frame",
        type=Path,
        default=None,
        metavar="IMAGE",
        help="image-to-video: the clip starts from this image (modules trained with ldm train-motion "
        "--first-frame; without it they start from the still of the seed and --first-frame-prompt)",
    )
    parser.add_argument(
        "--first-frame-prompt",
        default=None,
        metavar="TEXT",
        help="text-to-video with such modules: the prompt of the still the clip starts from (default: the "
        "prompt; on the default model, the moving-shapes world's start for it: the object where its motion "
        "has room)",
    )
    parser.add_argument("--frames", type=positive_int, default=16, help="frames of the clip")
    parser.add_argument(
        "--context",
        type=non_negative_int,
        default=16,
        help="frames denoised together: longer clips go in sliding windows of this many (0: no windows)",
    )
    parser.add_argument(
        "--overlap", type=non_negative_int, default=4, help="frames neighbouring windows share"
    )
    parser.add_argument(
        "--window-weighting",
        choices=("pyramid", "uniform"),
        default="pyramid",
        help="how overlapping windows' predictions are averaged",
    )
    add_model_option(parser)
    add_sampling_options(parser)
    parser.add_argument("--size", type=image_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("clip.gif"), help="the video: .mp4, .webm, .gif or .apng"
    )
    parser.add_argument("--fps", type=positive_fps, default=8.0, help="frames per second")
    parser.add_argument("--scale", type=positive_int, default=1, help="enlarge the frames N times (nearest)")
    parser.add_argument(
        "--frames-dir", type=Path, default=None, metavar="DIR", help="also write each frame as DIR/00000.png"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(num_images=1)


def positive_fps(text: str) -> float:
    from latentdiffusion.cli.video import positive_float

    return positive_float(text)


def check_motion_module(args: argparse.Namespace) -> Path | str:
    """The motion module to use, checked before the model loads: the given file or folder, or the shipped
    one's name ("default": given so, or none given on the default model)."""
    from latentdiffusion.pipelines.animate import (
        SHIPPED_MOTION,
        SHIPPED_MOTION_MODEL,
        is_shipped_motion_name,
        shipped_motion_module,
    )

    given = args.motion_module
    if given is None and args.model != SHIPPED_MOTION_MODEL:
        raise UserError(
            "give --motion-module FILE: an AnimateDiff motion module or MotionAdapter folder (the default "
            "model has its own, used when --motion-module is left out)"
        )
    if given is None or is_shipped_motion_name(given):
        shipped_motion_module()  # installed?
        return SHIPPED_MOTION
    if not given.exists():
        raise UserError(f"--motion-module {given} not found")
    return given


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.cli.video import check_walk_outputs, frame_writer
    from latentdiffusion.pipelines.video_io import write_video

    motion_module = check_motion_module(args)
    if args.first_frame is not None and not args.first_frame.is_file():
        raise UserError(f"--first-frame {args.first_frame} not found")
    check_walk_outputs(args)  # the video's suffix, its encoder and writable places, before any work
    pipe = load_model(args)
    width, height = args.size or (None, None)
    options = sampling_settings(args, resolve_seed(args.seed))
    del options["num_images"]
    frames = pipe.animate(
        args.prompt,
        width=width,
        height=height,
        motion_module=motion_module,
        frames=args.frames,
        context=args.context or None,
        overlap=args.overlap,
        window_weighting=args.window_weighting,
        motion_loras=args.motion_lora,
        first_frame=args.first_frame,
        first_frame_prompt=args.first_frame_prompt,
        **options,
    )
    if args.frames_dir is not None:
        write = frame_writer(args.frames_dir)
        for i, frame in enumerate(frames):
            write(i, frame)
    write_video(frames, args.output, args.fps, scale=args.scale)
    print(args.output)
    return 0
