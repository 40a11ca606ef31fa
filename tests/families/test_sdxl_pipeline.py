"""SDXL end to end against diffusers' StableDiffusionXLPipeline on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_fixtures import SCHEDULERS, SIZE, as_float

from latentdiffusion.families import MicroConditioning

pytest.importorskip("diffusers")


def latents(n: int, seed: int, channels: int = 4) -> torch.Tensor:
    return torch.randn(n, channels, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_guided_generation_matches_diffusers(sdxl, diffusers_sdxl, sampler):
    import diffusers

    ours, _ = sdxl("base")
    theirs = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    theirs.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(
        theirs.scheduler.config, timestep_spacing="leading"
    )
    start = latents(2, 3)
    prompts, negative = ["a red circle", "a blue square, high quality"], ["blurry", "ugly"]
    micro = {"original_size": (512, 384), "crops_coords_top_left": (16, 8), "target_size": (64, 48)}
    expected = theirs(
        prompts,
        negative_prompt=negative,
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        guidance_scale=5.0,
        latents=start.clone(),
        output_type="np",
        **micro,
    ).images
    images = ours.generate(
        prompts,
        negative_prompt=negative,
        width=SIZE,
        height=SIZE,
        steps=5,
        guidance_scale=5.0,
        sampler=sampler,
        latents=start,
        conditioning=MicroConditioning(**micro),
    )
    assert np.abs(as_float(images) - expected).max() <= 1 / 255 + 1e-6


def test_empty_negative_prompt_is_a_zero_condition_as_in_diffusers(sdxl, diffusers_sdxl):
    ours, _ = sdxl("base")
    theirs = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    start = latents(1, 5)
    expected = theirs(
        "a cat", height=SIZE, width=SIZE, num_inference_steps=4, latents=start.clone(), output_type="np"
    ).images
    images = ours.generate("a cat", width=SIZE, height=SIZE, steps=4, latents=start)
    assert np.abs(as_float(images) - expected).max() <= 1 / 255 + 1e-6


def test_negative_micro_conditioning_matches_diffusers(sdxl, diffusers_sdxl):
    """One prompt: diffusers repeats [negative, positive] time ids per prompt, which pairs them with the
    wrong rows of a larger batch."""
    ours, _ = sdxl("base")
    theirs = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    start = latents(1, 6)
    micro = {
        "original_size": (1024, 768),
        "target_size": (64, 64),
        # diffusers uses negative sizes only when both are given; its negative crop defaults to (0, 0)
        "negative_original_size": (128, 96),
        "negative_crops_coords_top_left": (8, 0),
        "negative_target_size": (64, 32),
    }
    common = {"height": SIZE, "width": SIZE, "guidance_scale": 4.0, "negative_prompt": "blurry"}
    expected = theirs(
        "a dog", num_inference_steps=4, latents=start.clone(), output_type="np", **common, **micro
    ).images
    images = ours.generate(
        "a dog", steps=4, sampler="dpmpp_2m", latents=start, conditioning=MicroConditioning(**micro), **common
    )
    assert np.abs(as_float(images) - expected).max() <= 1 / 255 + 1e-6
