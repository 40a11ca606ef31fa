"""``ldm samplers``: list the samplers and discretisations."""

from __future__ import annotations

import argparse

from latentdiffusion.cli.common import formatter


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("samplers", help="list the samplers", formatter_class=formatter)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentdiffusion.pipelines.metadata import SAMPLER_DISPLAY_NAMES
    from latentdiffusion.samplers import SAMPLERS

    width = max(len(name) for name in SAMPLERS)
    for name, function in SAMPLERS.items():
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        print(f"{name:<{width}}  {SAMPLER_DISPLAY_NAMES.get(name, name):<14} {summary}")
    print(
        "\nsigmas (--sigmas): the model's own timestep spacing (default), karras, exponential, leading, "
        "trailing, linspace; ComfyUI's sgm_uniform, beta, linear_quadratic, kl_optimal"
    )
    return 0
