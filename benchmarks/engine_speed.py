"""Seconds per U-Net call and per image, latentdiffusion beside diffusers on the same random weights.

    python benchmarks/engine_speed.py [--preset sd15] [--size 256] [--steps 20] [--repeats 5]

Both sides run the SD1.5 architecture in fp32 with identical weights (ours are written to a diffusers
folder with ``pipe.save(format="diffusers")`` and read back by diffusers), the same starting latents,
DPM++ 2M with the model's own timestep spacing, and classifier-free guidance (one U-Net call = batch 2).
Prints a markdown table of medians and the largest pixel difference between the two images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_call(unet: torch.nn.Module, size: int, context_dim: int, diffusers: bool) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(2, 77, context_dim, generator=generator)
    t = torch.tensor([500.0, 500.0])

    @torch.inference_mode()
    def call() -> object:
        if diffusers:
            return unet(x, t, encoder_hidden_states=context).sample
        return unet(x, t, context)

    return call


def build(preset: str):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    import latentdiffusion as ld

    ours = ld.load(f"preset:{preset}")
    with tempfile.TemporaryDirectory() as folder:
        ours.save(folder, format="diffusers")
        theirs = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="U-Net calls timed (median reported)")
    parser.add_argument("--image-repeats", type=int, default=1, help="whole images timed per side")
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, theirs = build(args.preset)
    context_dim = ours.config.unet.context_dim
    unet_ours = median_seconds(unet_call(ours.unet, args.size, context_dim, False), args.repeats)
    unet_theirs = median_seconds(unet_call(theirs.unet, args.size, context_dim, True), args.repeats)

    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(1))
    prompt, settings = "a photograph of an astronaut riding a horse", {"guidance_scale": 7.5}
    images: dict[str, np.ndarray] = {}

    def run_ours() -> None:
        image = ours.generate(
            prompt,
            width=args.size,
            height=args.size,
            steps=args.steps,
            latents=latents,
            sampler="dpmpp_2m",
            **settings,
        )[0]
        images["ours"] = np.asarray(image, dtype=np.int16)

    def run_theirs() -> None:
        image = theirs(
            prompt,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            latents=latents.clone(),
            **settings,
        ).images[0]
        images["theirs"] = np.asarray(image, dtype=np.int16)

    image_ours = median_seconds(run_ours, args.image_repeats, warmup=0)
    image_theirs = median_seconds(run_theirs, args.image_repeats, warmup=0)
    difference = int(np.abs(images["ours"] - images["theirs"]).max())

    print(
        f"{args.preset} architecture, random weights, fp32, {args.size}x{args.size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"| implementation | U-Net CFG call (batch 2), median s | image, {args.steps} steps DPM++ 2M, s |")
    print("|---|---|---|")
    print(f"| latentdiffusion | {unet_ours:.3f} | {image_ours:.2f} |")
    print(f"| diffusers | {unet_theirs:.3f} | {image_theirs:.2f} |")
    print(f"\nlargest pixel difference between the two images (0-255): {difference}")


if __name__ == "__main__":
    main()
