"""How much each model relies on its captions (``latentdiffusion.evaluation.caption_reliance``): the
denoising loss on shapes-world images with their own captions and with each caption moved to the next
image, at fixed timesteps; a ratio of 1 means the network ignores its captions.

    python benchmarks/caption_reliance.py MODEL [MODEL ...] [--n 32] [--timesteps 999 900 600 300] \
        [--relational 0] [--seed 0]

MODEL is any folder ``ld.load`` reads (a training run's ``export``, "default"). Images: the first ``--n``
scenes of the shapes stream with seed 12345 (not a training stream), single-object unless
``--relational`` gives a share of two-object scenes, at the model's image size. Prints a markdown table
and the CPU flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from cpu import cpu_flags  # this folder is on sys.path (above)
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation.caption_reliance import TIMESTEPS, caption_reliance
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor

SCENE_SEED = 12345


def scenes(n: int, size: int, relational: float) -> tuple[torch.Tensor, list[str]]:
    data = ShapesDataset(SCENE_SEED, relational_fraction=relational)
    items = [data[i] for i in range(n)]
    return images_to_tensor([image.resize((size, size)) for image, _ in items]), [c for _, c in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+")
    parser.add_argument("--n", type=int, default=32, help="scenes (at least 2)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    parser.add_argument("--relational", type=float, default=0.0, help="share of two-object scenes")
    parser.add_argument("--seed", type=int, default=0, help="the noise draw")
    args = parser.parse_args(argv)
    print(f"CPU flags: {cpu_flags()}; torch threads {torch.get_num_threads()}\n")
    header = " | ".join(f"t={t}: own / moved / ratio" for t in args.timesteps)
    print(f"| model | {header} |\n|---|" + "---:|" * len(args.timesteps))
    try:
        for model in args.models:
            components = load_components(model)
            images, captions = scenes(args.n, components.config.sample_size, args.relational)
            found = caption_reliance(components, images, captions, args.timesteps, args.seed)
            cells = " | ".join(f"{r.own:.4f} / {r.moved:.4f} / **{r.ratio:.3f}**" for r in found)
            print(f"| {model} | {cells} |", flush=True)
    except UserError as error:
        print(f"caption_reliance: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
