"""``ldm finetune``: fine-tune a model that ``ld.load`` reads, all weights of its denoising network (the
U-Net, or SD3's MMDiT) or LoRA adapters.

    ldm finetune --model PATH --data.path=IMAGES/ [--lora [--rank 8] [--alpha 8] [--targets attention,ff]]
                 [-o DIR] [--resume] [--KEY=VALUE ...]

Data and training options are those of ``ldm train`` (``--KEY=VALUE`` for any field of the training
config); the architecture comes from the model. A LoRA run exports ``DIR/export/lora.safetensors`` (kohya /
A1111 format, for ``ldm generate --lora``), a full run the whole model in ``DIR/export``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiffusion.cli.common import finite_float, formatter, positive_int
from latentdiffusion.cli.train import add_override_options, overrides

LORA_TARGETS = ("attention", "ff", "proj", "resnets", "text")  # as models.lora.TARGETS (kept import-free)
DESCRIPTION = (
    "Fine-tune a Stable Diffusion model (a .safetensors/.ckpt file, a diffusers folder or a model folder) "
    "on your images: all weights of its denoising network (U-Net or SD3's MMDiT), or with --lora small "
    "low-rank adapters saved as a LoRA file. "
    "Set any training option with --KEY=VALUE as for `ldm train` (--data.path=photos/ --max_steps=2000 "
    "--optim.lr=1e-4); --show-config prints them all. Under torchrun --nproc_per_node N the same command "
    "trains with N processes."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a model on your images (full or LoRA)",
        description=DESCRIPTION,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--model", default=None, help="the model to start from (required unless --resume finds it)"
    )
    parser.add_argument(
        "--lora", action="store_true", help="train LoRA adapters instead of the whole network"
    )
    parser.add_argument("--rank", type=positive_int, default=None, help="LoRA rank r (default 8)")
    parser.add_argument(
        "--alpha", type=finite_float, default=None, help="LoRA alpha; updates scale by alpha / r (default r)"
    )
    parser.add_argument(
        "--targets",
        type=lora_targets,
        default=None,
        help=f"comma-separated layers to adapt, from {', '.join(LORA_TARGETS)} (default attention)",
    )
    add_run_options(parser)
    parser.set_defaults(run=run)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The run-folder flags of the commands that train from a loaded model (finetune, train-controlnet)."""
    parser.add_argument("-o", "--output", type=Path, default=None, help="run folder (default runs/NAME)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no config print-out and no progress bar")
    add_override_options(parser)


def lora_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise argparse.ArgumentTypeError(
            f"unknown LoRA targets {', '.join(unknown) or '(none)'}; choose from {', '.join(LORA_TARGETS)}"
        )
    return targets


def resolve_lora(args: argparse.Namespace, saved: dict | None):
    """LoRA options from the flags; on --resume without LoRA flags, the run's saved ones."""
    from latentdiffusion.errors import UserError
    from latentdiffusion.training.finetune import LoRAOptions, lora_options

    given = {
        k: v
        for k, v in (("rank", args.rank), ("alpha", args.alpha), ("targets", args.targets))
        if v is not None
    }
    if saved is not None and not (args.lora or given):
        return lora_options(saved)
    if given and not args.lora:
        raise UserError(f"--{next(iter(given))} sets up LoRA training: add --lora")
    return LoRAOptions(**given) if args.lora else None


def resolve_config(args: argparse.Namespace, model: str, model_config, lora: bool):
    """The fine-tuning defaults (or the run's saved config on --resume), then --KEY=VALUE overrides."""
    from latentdiffusion.training.finetune import finetune_config

    saved = saved_run_config(args, model)
    if saved is not None:
        return saved
    return finetune_config(model, model_config, lora=lora, overrides=overrides(args))


def saved_run_config(args: argparse.Namespace, model: str):
    """On --resume, the run's saved config with ``init`` = ``model`` and the --KEY=VALUE overrides; else
    None."""
    from latentdiffusion.training.config import apply_overrides, from_dict, load_config_file
    from latentdiffusion.training.loop import CONFIG_FILE

    saved = args.output / CONFIG_FILE if args.resume and args.output is not None else None
    if saved is None or not saved.is_file():
        return None
    return apply_overrides(from_dict(load_config_file(str(saved))), overrides(args) | {"init": model})


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.errors import UserError
    from latentdiffusion.pipelines.loading import load_components
    from latentdiffusion.training.config import validate
    from latentdiffusion.training.finetune import finetune, saved_options

    saved = saved_options(args.output) if args.resume and args.output is not None else None
    lora = resolve_lora(args, saved)
    model = args.model or saved_init(args)
    if model is None:
        raise UserError("pass --model PATH: the model to fine-tune")
    components = load_components(model)
    config = validate(resolve_config(args, model, components.config, lora is not None))
    if args.show_config:
        print(config.to_json())
        return 0
    run_dir = args.output or Path("runs") / config.name
    result = finetune(
        config, run_dir, lora, resume=args.resume, verbose=not args.quiet, components=components
    )
    if result.lora_file is not None:
        print(f"step {result.run.step}: LoRA saved to {result.lora_file}")
    elif result.model_dir is not None:
        print(f"step {result.run.step}: model exported to {result.model_dir}")
    return 0


def saved_init(args: argparse.Namespace) -> str | None:
    """On --resume, the model the run in --output was started from (its saved ``init``)."""
    from latentdiffusion.training.config import load_config_file
    from latentdiffusion.training.loop import CONFIG_FILE

    if not (args.resume and args.output is not None and (args.output / CONFIG_FILE).is_file()):
        return None
    return load_config_file(str(args.output / CONFIG_FILE)).get("init")
