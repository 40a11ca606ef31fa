"""``ldm train-controlnet``: train a ControlNet for a model that ``ld.load`` reads.

    ldm train-controlnet --model MODEL [--hint shapes-layout|canny|...] [-o DIR] [--resume] [--KEY=VALUE ...]

The base model stays frozen; the ControlNet starts from its U-Net's encoder with zero convolutions at
zero. Data and training options are those of ``ldm train`` (``--KEY=VALUE`` for any field of the
training config). The run exports ``DIR/export``, a diffusers ControlNet folder for ``--control``.
"""

from __future__ import annotations

import argparse

from latentdiffusion.cli.common import finite_float, formatter, positive_int
from latentdiffusion.cli.finetune import add_run_options, frozen_model_run
from latentdiffusion.cli.train import overrides

DESCRIPTION = (
    "Train a ControlNet for a model (the shipped 'default', a .safetensors/.ckpt file, a diffusers folder "
    "or a model folder), the model itself frozen. --hint shapes-layout (default) trains on the shapes "
    "world with its layout map as hint (each object's region in its colour on the background colour); "
    "a preprocessor name (canny, softedge_sobel, ...) computes the hint from each image of the data set "
    "(--data.dataset=imagefolder --data.path=DIR). Set any training option with --KEY=VALUE as for `ldm "
    "train` (--max_steps=3000 --optim.lr=1e-4 --batch_size=32); --show-config prints them all. Under "
    "torchrun --nproc_per_node N the same command trains with N processes. The export (DIR/export) is a "
    "diffusers ControlNet folder: ldm generate ... --control DIR/export:HINT.png"
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train-controlnet",
        help="train a ControlNet for a model (layout maps, canny, ...)",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    parser.add_argument("--model", default=None, help="the base model (required unless --resume finds it)")
    parser.add_argument(
        "--hint", default=None, help="shapes-layout (default) or a preprocessor name (canny, ...)"
    )
    parser.add_argument(
        "--hint-channels",
        type=hint_channels,
        default=None,
        help="comma-separated widths of the hint encoder's stages (default 16,32,... to the latent size)",
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        help="fine-tune this ControlNet (a folder, a file or 'layout', the shipped one) instead of "
        "starting from the model's U-Net",
    )
    parser.add_argument(
        "--object-weight",
        type=finite_float,
        default=None,
        help="shapes-layout hint: the loss weight of latent pixels under objects against background "
        "ones (unset: 1, the plain loss)",
    )
    add_run_options(parser)
    parser.set_defaults(run=run)


def hint_channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(positive_int(part.strip()) for part in text.split(","))
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths, got {text!r}") from None


def resolve_options(args: argparse.Namespace, saved):
    """The hint options from the flags; on --resume, the run's saved ones where no flag is given."""
    from latentdiffusion.training.controlnet import ControlNetOptions

    base = saved or ControlNetOptions()
    hint = args.hint or base.hint
    channels = args.hint_channels if args.hint_channels is not None else base.hint_channels
    init = args.controlnet or base.init
    weight = args.object_weight if args.object_weight is not None else base.object_weight
    return ControlNetOptions(hint, channels, init, weight)


def new_config(args: argparse.Namespace):
    """The ControlNet defaults for a new run, then --KEY=VALUE overrides."""
    from latentdiffusion.training.controlnet import controlnet_config

    return lambda model, model_config: controlnet_config(model, model_config, overrides(args))


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.training.controlnet import saved_options, train_controlnet

    saved = saved_options(args.output) if args.resume and args.output is not None else None
    options = resolve_options(args, saved)
    options.validate()
    planned = frozen_model_run(args, "the base model the ControlNet is trained for", new_config(args))
    if planned is None:
        return 0
    config, run_dir = planned
    result = train_controlnet(config, run_dir, options, resume=args.resume, verbose=not args.quiet)
    if result.export_dir is not None:
        print(f"step {result.step}: ControlNet saved to {result.export_dir}")
    return 0
