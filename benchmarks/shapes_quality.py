"""Image quality of the shipped small models on held-out shapes-world images (seed 2024, not the training
stream): the first-stage autoencoder, the trained preview decoder and the x4 upscaler.

    python benchmarks/shapes_quality.py [--n 16] [--model default] [--upscaler upscaler]

Prints a markdown table of PSNR (dB, images in [-1, 1]):
- autoencoder: D(E(x)) against x, over all pixels and over the objects' own pixels (those whose colour
  differs from the background), where the shapes' edges and colours are decided;
- preview decoder: its images of E(x) against the real decoder's D(E(x)), beside the linear previewer;
- upscaler: ``pipe.upscale`` of the 16x16 bicubic shrink (its defaults: 20 steps, noise level 20, the
  model's guidance) against the 64x64 original, beside bicubic enlargement, and the output shrunk back
  against the input (consistency).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from PIL import Image

HELD_OUT_SEED = 2024


def db(mse: float) -> float:
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def held_out(n: int) -> tuple[torch.Tensor, list[Image.Image], list[str]]:
    from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor

    items = [ShapesDataset(HELD_OUT_SEED)[i] for i in range(n)]
    images = [image.convert("RGB") for image, _ in items]
    return images_to_tensor(images), images, [caption for _, caption in items]


@torch.inference_mode()
def first_stage_rows(model: str, x: torch.Tensor) -> list[tuple[str, float]]:
    import latentdiffusion as ld
    from latentdiffusion.evaluation.reconstruction import masked_psnr, object_mask
    from latentdiffusion.pipelines.preview import fit_previewer

    components = ld.load(model, precision="fp32").components
    vae = components.autoencoder
    z = vae.to_latent(x)
    decoded = vae.from_latent(z).clamp(-1, 1)
    rows = [
        ("autoencoder, all pixels", db(F.mse_loss(decoded, x).item())),
        ("autoencoder, object pixels", masked_psnr(decoded, x, object_mask(x))),
    ]
    factor = components.config.autoencoder.downsampling_factor
    linear = F.interpolate(fit_previewer(vae, factor).to_rgb(z), scale_factor=factor, mode="nearest")
    rows.append(("linear previewer vs decoder", db(F.mse_loss(linear, decoded).item())))
    if components.preview_decoder is not None:
        preview = components.preview_decoder(z)
        rows.append(("preview decoder vs decoder", db(F.mse_loss(preview, decoded).item())))
    return rows


def upscaler_rows(upscaler: str, x: torch.Tensor, images: list[Image.Image], captions: list[str]):
    import latentdiffusion as ld
    from latentdiffusion.training.shapes import images_to_tensor
    from latentdiffusion.training.upscaler import downsample

    pipe = ld.load(upscaler, precision="fp32")
    small = [image.resize((16, 16), Image.Resampling.BICUBIC) for image in images]
    upscaled = [pipe.upscale(s, c, seed=i)[0] for i, (s, c) in enumerate(zip(small, captions, strict=True))]
    bicubic = [s.resize((64, 64), Image.Resampling.BICUBIC) for s in small]
    up, bi = images_to_tensor(upscaled), images_to_tensor(bicubic)
    return [
        ("upscaler vs original", db(F.mse_loss(up, x).item())),
        ("bicubic vs original", db(F.mse_loss(bi, x).item())),
        (
            "upscaler shrunk back vs its input",
            db(F.mse_loss(downsample(up, 4), images_to_tensor(small)).item()),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=16, help="held-out images")
    parser.add_argument("--model", default="default", help="model with the autoencoder (and preview decoder)")
    parser.add_argument("--upscaler", default="upscaler", help="upscaler model; 'none' skips it")
    args = parser.parse_args()
    x, images, captions = held_out(args.n)
    rows = first_stage_rows(args.model, x)
    if args.upscaler != "none":
        rows += upscaler_rows(args.upscaler, x, images, captions)
    print(f"| {args.n} held-out shapes images | PSNR, dB |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
