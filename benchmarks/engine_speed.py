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


def median_seconds(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall-clock seconds of each function, timed in alternation so that a change in the
    machine's load affects every contender alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def unet_call(
    unet: torch.nn.Module, latent_size: int, context_dim: int, diffusers: bool
) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent_size, latent_size, generator=generator)
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
    latent_size = args.size // ours.config.autoencoder.downsampling_factor
    unet = median_seconds(
        {
            "ours": unet_call(ours.unet, latent_size, context_dim, False),
            "theirs": unet_call(theirs.unet, latent_size, context_dim, True),
        },
        args.repeats,
    )

    latents = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(1))
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

    image = median_seconds({"ours": run_ours, "theirs": run_theirs}, args.image_repeats, warmup=0)
    difference = int(np.abs(images["ours"] - images["theirs"]).max())

    print(
        f"{args.preset} architecture, random weights, fp32, {args.size}x{args.size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"| implementation | U-Net CFG call (batch 2), median s | image, {args.steps} steps DPM++ 2M, s |")
    print("|---|---|---|")
    print(f"| latentdiffusion | {unet['ours']:.3f} | {image['ours']:.2f} |")
    print(f"| diffusers | {unet['theirs']:.3f} | {image['theirs']:.2f} |")
    print(f"\nlargest pixel difference between the two images (0-255): {difference}")


if __name__ == "__main__":
    main()
