"""``ldm train-autoencoder``, ``ldm train``, ``ldm train-upscaler`` and ``ldm train-preview``: training from
the command line.

    ldm train-autoencoder [CONFIG.json] [--preset shapes-autoencoder] [--output DIR] [--KEY=VALUE ...]
    ldm train [CONFIG.json] [--preset shapes] --autoencoder AE_RUN/export [--output DIR] [--KEY=VALUE ...]
    ldm train-upscaler [CONFIG.json] [--preset shapes-upscaler] [--autoencoder MODEL] [--output DIR] ...
    ldm train-preview [CONFIG.json] [--preset shapes-preview] [--autoencoder MODEL] [--output DIR] ...

Any field of the training config can be set with a dotted key (``--optim.lr=3e-4``,
``--model.unet.model_channels=64``); values are checked against the field's type. Under
``torchrun --nproc_per_node N`` the same command trains with N processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiffusion.cli.common import formatter

OVERRIDE_PREFIX = "override:"
COMMANDS = (  # (subcommand, task, default preset, help)
    ("train-autoencoder", "autoencoder", "shapes-autoencoder", "train the first stage: a KL autoencoder"),
    ("train", "diffusion", "shapes", "train the text-conditioned latent diffusion U-Net"),
    ("train-upscaler", "upscaler", "shapes-upscaler", "train a latent x4 upscaler (super-resolution U-Net)"),
    ("train-preview", "preview", "shapes-preview", "train a tiny preview decoder for a model's autoencoder"),
)
AUTOENCODER_HELP = {
    "diffusion": "the trained autoencoder (export folder of train-autoencoder), frozen",
    "upscaler": "the model whose autoencoder the upscaler decodes with, frozen (default: the preset's, "
    "'default' = the shipped model)",
    "preview": "the model whose autoencoder the preview decoder imitates (default: the preset's, 'default')",
}
OWN_OPTIONS = ("init", "autoencoder")  # config keys set by dedicated options below
DESCRIPTION = (
    "Set any field of the training config with --KEY=VALUE, dotted into sections (--optim.lr=3e-4, "
    "--model.unet.model_channels=64); --show-config prints them all. Under torchrun --nproc_per_node N "
    "the same command trains with N processes (DistributedDataParallel)."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    for name, task, preset, help_text in COMMANDS:
        parser = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. {DESCRIPTION}",
            formatter_class=formatter,
        )
        parser.add_argument(
            "config",
            nargs="?",
            help='JSON config: a run\'s config.json, or overrides with an optional "preset" key',
        )
        parser.add_argument(
            "--preset", default=None, help=f"training preset (default {preset}); see --show-config"
        )
        parser.add_argument("-o", "--output", type=Path, default=None, help="run folder (default runs/NAME)")
        parser.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
        parser.add_argument(
            "--init", default=None, help="start from this model folder instead of random weights"
        )
        if task in AUTOENCODER_HELP:
            parser.add_argument("--autoencoder", default=None, help=AUTOENCODER_HELP[task])
        parser.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
        parser.add_argument("--quiet", action="store_true", help="no config print-out and no progress bar")
        add_override_options(parser)
        parser.set_defaults(run=run, task=task, default_preset=preset)


def add_override_options(parser: argparse.ArgumentParser) -> None:
    """One hidden ``--KEY`` option per config field (also spelt with dashes): ``--KEY=VALUE``."""
    from latentdiffusion.training.config import config_keys

    group = parser.add_argument_group("config overrides", "--KEY=VALUE for any field shown by --show-config")
    for key in config_keys():
        if key in OWN_OPTIONS:
            continue
        spellings = sorted({f"--{key}", f"--{key.replace('_', '-')}"})
        group.add_argument(
            *spellings, dest=OVERRIDE_PREFIX + key, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )


def overrides(args: argparse.Namespace) -> dict[str, str]:
    return {
        k.removeprefix(OVERRIDE_PREFIX): v for k, v in vars(args).items() if k.startswith(OVERRIDE_PREFIX)
    }


def resolve_config(args: argparse.Namespace):
    """Preset or config file, then the run's saved config on --resume, then --KEY=VALUE overrides."""
    from latentdiffusion.training.config import apply_overrides, flatten, from_dict, load_config_file
    from latentdiffusion.training.presets import get_train_preset

    saved = _saved_config(args)
    if args.config:
        data = load_config_file(args.config)
        if "task" in data and "model" in data:
            config = from_dict(data)
        else:
            preset = data.pop("preset", None) or args.preset or args.default_preset
            config = apply_overrides(get_train_preset(preset, args.task), flatten(data))
    elif saved is not None and args.preset is None:
        config = from_dict(saved)
    else:
        config = get_train_preset(args.preset or args.default_preset, args.task)
    explicit = {key: getattr(args, key, None) for key in OWN_OPTIONS}
    config = apply_overrides(config, overrides(args) | {k: v for k, v in explicit.items() if v is not None})
    _check_task(config, args.task)
    return config


def _saved_config(args: argparse.Namespace) -> dict | None:
    if not (args.resume and args.output is not None):
        return None
    from latentdiffusion.training.config import load_config_file
    from latentdiffusion.training.loop import CONFIG_FILE

    path = args.output / CONFIG_FILE
    return load_config_file(str(path)) if path.is_file() else None


def _check_task(config, task: str) -> None:
    from latentdiffusion.errors import UserError

    if config.task != task:
        command = next(name for name, t, _, _ in COMMANDS if t == config.task)
        raise UserError(f"this config trains the {config.task}; run it with `ldm {command}`")


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.training.config import validate

    config = validate(resolve_config(args))
    if args.show_config:
        print(config.to_json())
        return 0
    run_dir = args.output or Path("runs") / config.name
    from latentdiffusion.training.loop import train

    result = train(config, run_dir, resume=args.resume, verbose=not args.quiet)
    if result.export_dir is not None:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if k.startswith("eval/"))
        print(f"step {result.step}: {metrics or 'done'}; model exported to {result.export_dir}")
    return 0
