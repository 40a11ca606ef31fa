"""``ldm train-motion``: train motion modules (AnimateDiff) for a U-Net model on the moving-shapes world.

    ldm train-motion --model MODEL [--frames 16] [--depth 1] [--mid-block] [-o DIR] [--resume]
                     [--words [WORD ...]] [--words-lr 5e-3] [--spatial-lora RANK] [--text-attention]
                     [--noise-correlation ALPHA] [--contrast-margin M] [--KEY=VALUE ...]

The base model stays frozen; fresh motion modules (``proj_out`` at zero) are the only trained network.
Training options are those of ``ldm train`` (``--KEY=VALUE``). The run exports
``DIR/export/motion_module.safetensors`` for ``ldm video --motion-module``. ``--words`` also learns the
input vectors of those prompt words (textual inversion; no words: the moving-shapes motion vocabulary),
exported as ``DIR/export/embeddings/WORD.safetensors``, which the module's users load with it.
``--text-attention`` makes each module's second attention a cross-attention to the prompt (AnimateDiff's
"Temporal_Cross" block type), so the modules read the motion words directly.
"""

from __future__ import annotations

import argparse

from latentdiffusion.cli.common import formatter, positive_int
from latentdiffusion.cli.finetune import add_run_options, frozen_model_run
from latentdiffusion.cli.train import overrides

DESCRIPTION = (
    "Train AnimateDiff motion modules for a U-Net model (the shipped 'default', a .safetensors/.ckpt "
    "file, a diffusers folder or a model folder), the model itself frozen, on the moving-shapes world "
    "(clips of the shapes world in motion, --data.dataset=moving_shapes). Set any training option with "
    "--KEY=VALUE as for `ldm train` (--max_steps=3000 --optim.lr=1e-4 --batch_size=2); --show-config "
    "prints them all. One process only. The export is DIR/export/motion_module.safetensors: "
    "ldm video PROMPT --model MODEL --motion-module DIR/export/motion_module.safetensors"
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train-motion",
        help="train motion modules (text-to-video) for a model on the moving-shapes world",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    parser.add_argument("--model", default=None, help="the base model (required unless --resume finds it)")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames per clip (default 16)")
    parser.add_argument("--depth", type=positive_int, default=None, help="blocks per module (default 1)")
    parser.add_argument("--mid-block", action="store_true", default=None, help="a module in the middle block")
    parser.add_argument(
        "--words",
        nargs="*",
        default=None,
        metavar="WORD",
        help="also learn these prompt words' input vectors (textual inversion, exported beside the module); "
        "without words: the moving-shapes motion vocabulary (moving bouncing left right up down slowly "
        "quickly growing shrinking)",
    )
    parser.add_argument(
        "--words-lr", type=float, default=None, help="the words' learning rate (default 5e-3)"
    )
    parser.add_argument(
        "--spatial-lora",
        type=int,
        default=None,
        metavar="RANK",
        help="also train LoRA adapters of this rank on the U-Net's attention layers, exported beside the "
        "module as NAME.lora.safetensors for --lora (default: none)",
    )
    parser.add_argument(
        "--text-attention",
        action="store_true",
        default=None,
        help="the modules' second attention attends to the prompt's text states (AnimateDiff's "
        "Temporal_Cross; such files load in this project and AnimateDiff's own code, not in diffusers)",
    )
    parser.add_argument(
        "--noise-correlation",
        type=float,
        default=None,
        metavar="ALPHA",
        help="train (and sample) with the mixed noise prior: each frame's noise shares a part of weight "
        "ALPHA with the clip's other frames (Ge et al. 2023; 0: independent frames, the default); "
        "recorded in the module file",
    )
    parser.add_argument(
        "--contrast-margin",
        type=float,
        default=None,
        metavar="M",
        help="also make the motion words matter: each clip is denoised a second time, in the same batch, "
        "with its caption's motion reversed (left <-> right, up <-> down, the bouncing axis swapped, "
        "growing <-> shrinking), and a hinge asks that loss to exceed the clip's own by the fraction M "
        "(default 0: off)",
    )
    parser.add_argument(
        "--first-frame",
        action="store_true",
        default=None,
        help="train modules that animate a given first frame: frame 0 of each clip is seen clean and only "
        "the later frames are learned; `ldm video` makes the first frame with the image model from the "
        "prompt, then animates it (recorded in the module file)",
    )
    parser.add_argument(
        "--spacetime-conv",
        action="store_true",
        default=None,
        help="each module starts with a residual 3x3x3 convolution over frames and pixels, so a frame reads "
        "the neighbourhood of the frames beside it (not in AnimateDiff's releases; the file's keys say so)",
    )
    add_run_options(parser)
    parser.set_defaults(run=run)


def resolve_options(args: argparse.Namespace, saved):
    """The module options from the flags; on --resume, the run's saved ones where no flag is given."""
    from dataclasses import replace

    from latentdiffusion.training.motion import MOVING_SHAPES_WORDS, MotionOptions

    options = saved or MotionOptions()
    given = {
        k: getattr(args, k)
        for k in (
            "frames",
            "depth",
            "mid_block",
            "words_lr",
            "spatial_lora",
            "text_attention",
            "noise_correlation",
            "contrast_margin",
            "first_frame",
            "spacetime_conv",
        )
    }
    if args.words is not None:
        given["words"] = tuple(args.words) or MOVING_SHAPES_WORDS
    return replace(options, **{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.training.motion import motion_config, saved_options, train_motion

    saved = saved_options(args.output) if args.resume and args.output is not None else None
    options = resolve_options(args, saved)
    options.validate()
    planned = frozen_model_run(
        args,
        "the base model the motion modules are trained for",
        lambda model, model_config: motion_config(model, model_config, overrides(args)),
    )
    if planned is None:
        return 0
    config, run_dir = planned
    result = train_motion(config, run_dir, options, resume=args.resume, verbose=not args.quiet)
    if result.export_dir is not None:
        print(f"step {result.step}: motion modules saved to {result.export_dir}")
    return 0
