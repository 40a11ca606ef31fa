"""First-stage reconstruction quality on held-out shapes-world images (seed 2024, not the training
stream), several autoencoders side by side, the data itself as the first row.

    python benchmarks/autoencoder_quality.py [--n 200] [MODEL ...]   # default: the shipped model's

MODEL is anything ``ld.load`` reads (``default``, an autoencoder run's ``export`` folder). Columns
(``latentdiffusion.evaluation.reconstruction``; D(mode of E(x)) clamped to [-1, 1]):
- PSNR over all pixels and over the object pixels (colour differs from the background; edges included);
- flatness: RMS deviation (0-255) from the region's mean inside object fills eroded by 2 px and inside
  the background 2 px away from objects (the data: 0);
- corners: the strict checker's corner mass of the squares it finds (mean, and share >= its 0.95 limit);
- strict: share of reconstructions that pass the strict shapes checker (``check(..., strict=True)``
  against the image's caption, every attribute), and the criteria that fail most often.

``--recoloured`` adds a second table on the same images with every image's colours remapped per channel
by a random affine map (``training.autoencoder.remap_colours``, seeded): how the first stage draws colours
outside the shapes world's palette (the strict checker, which names palette colours, is left out there).
"""

from __future__ import annotations

import argparse
import collections
import platform

import torch

from shapes_quality import HELD_OUT_SEED, held_out  # the same held-out images


@torch.inference_mode()
def reconstruct(model: str, x: torch.Tensor, batch: int = 50) -> tuple[torch.Tensor, int]:
    import latentdiffusion as ld

    vae = ld.load(model, precision="fp32").components.autoencoder.float().eval()
    parts = [vae.decode(vae.encode(chunk).mode()).clamp(-1, 1) for chunk in x.split(batch)]
    return torch.cat(parts), sum(p.numel() for p in vae.parameters())


def recolour(x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """``x`` with each image's channels mapped by their own random affine map (range kept)."""
    from latentdiffusion.training.autoencoder import remap_colours
    from latentdiffusion.training.task import StepRandom

    return remap_colours(x, StepRandom(seed, 0, len(x), torch.arange(len(x))), share=1.0)


def row(
    name: str, x: torch.Tensor, y: torch.Tensor, captions: list[str], strict: bool = True
) -> dict[str, str]:
    from latentdiffusion.evaluation.reconstruction import (
        flat_regions,
        flatness,
        masked_psnr,
        object_mask,
        square_corners,
    )
    from latentdiffusion.evaluation.shapes_checker import MIN_CORNER_MASS, check
    from latentdiffusion.pipelines.text_to_image import tensor_to_images

    images = tensor_to_images(y)
    objects_flat, background_flat = flatness(y, flat_regions(x))
    corners = torch.tensor(square_corners(images) or [float("nan")])
    columns = {
        "autoencoder": name,
        "PSNR all": f"{masked_psnr(x, y, torch.ones_like(x[:, :1], dtype=torch.bool)):.2f}",
        "PSNR objects": f"{masked_psnr(x, y, object_mask(x)):.2f}",
        "flat: fills": f"{objects_flat:.2f}",
        "flat: background": f"{background_flat:.2f}",
        "corners (squares)": f"{corners.mean():.3f} ({(corners >= MIN_CORNER_MASS).float().mean():.0%})",
    }
    if not strict:
        return columns
    verdicts = [check(image, caption, strict=True) for image, caption in zip(images, captions, strict=True)]
    misses = collections.Counter(k for v in verdicts for k, ok in v.items() if not ok and k != "all")
    return columns | {
        "strict pass": f"{sum(v['all'] for v in verdicts) / len(verdicts):.1%}",
        "most failed": ", ".join(f"{k} {c}" for k, c in misses.most_common(3)) or "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", default=["default"], help="models whose autoencoders to compare")
    parser.add_argument("--n", type=int, default=200, help="held-out images")
    parser.add_argument("--recoloured", action="store_true", help="also the same images in random colours")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, _, captions = held_out(args.n)
    print(
        f"{args.n} held-out shapes images (seed {HELD_OUT_SEED}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n"
    )
    print_table(table(args.models, x, captions, strict=True))
    if args.recoloured:
        print("\nThe same images, each in random colours (an affine map per channel):\n")
        print_table(table(args.models, recolour(x), captions, strict=False))


def table(models: list[str], x: torch.Tensor, captions: list[str], strict: bool) -> list[dict[str, str]]:
    rows = [row("data (the images themselves)", x, x, captions, strict)]
    for model in models:
        y, parameters = reconstruct(model, x)
        rows.append(row(f"{model} ({parameters / 1e6:.2f} M)", x, y, captions, strict))
    return rows


def print_table(rows: list[dict[str, str]]) -> None:
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(r.values()) + " |")


if __name__ == "__main__":
    main()
