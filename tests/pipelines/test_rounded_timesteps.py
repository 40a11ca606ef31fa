"""Whole or fractional network timesteps off the training grid, end to end against diffusers.

With Karras sigmas diffusers' DPM-Solver++ feeds the U-Net rounded training timesteps and its Euler
scheduler fractional ones; ``SamplingOptions.round_timesteps`` (on by default) picks which we feed. On
a v-prediction model fractional timesteps moved DPM++ 2M Karras images by 0.019 on average (up to 0.2)
against diffusers.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import SamplingOptions
from latentdiffusion.pipelines.text_to_image import text_to_image

SIZE = 32
EIGHT_BIT = 1 / 255 + 1e-6  # one 8-bit rounding step


@pytest.fixture(scope="module")
def v_model(tiny_model, diffusers_pipeline):
    """Our tiny model and diffusers' StableDiffusionPipeline, both read as v-prediction models."""
    components = tiny_model("sd").ours
    schedule = replace(components.config.schedule, prediction_type="v_prediction")
    ours = replace(components, config=replace(components.config, schedule=schedule))
    return ours, diffusers_pipeline("StableDiffusionPipeline", "sd")


def run_both(v_model, scheduler: str, options: SamplingOptions) -> tuple[np.ndarray, np.ndarray]:
    """(ours, diffusers') images in [0, 1] for two prompts from the same starting latents."""
    import diffusers

    ours, theirs = v_model
    theirs.scheduler = getattr(diffusers, scheduler).from_config(
        theirs.scheduler.config,
        prediction_type="v_prediction",
        timestep_spacing="leading",
        use_karras_sigmas=True,
    )
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(6))
    prompts, negatives = ["a red circle", "a blue square"], ["blurry", ""]
    size = {"height": SIZE, "width": SIZE}
    expected = theirs(
        prompts,
        negative_prompt=negatives,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance_scale,
        latents=latents.clone(),
        output_type="np",
        **size,
    ).images
    images = text_to_image(ours, Request(prompts, negatives, [0, 1], options, latents), **size)
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images]), expected


def karras(sampler: str, **fields) -> SamplingOptions:
    return SamplingOptions(steps=8, sampler=sampler, sigmas="karras", guidance_scale=5.0, **fields)


def test_dpmpp_2m_karras_rounds_timesteps_like_diffusers(v_model):
    actual, expected = run_both(v_model, "DPMSolverMultistepScheduler", karras("dpmpp_2m"))
    assert np.abs(actual - expected).max() <= EIGHT_BIT
    fractional, _ = run_both(
        v_model, "DPMSolverMultistepScheduler", karras("dpmpp_2m", round_timesteps=False)
    )
    assert np.abs(fractional - expected).mean() > 4 * EIGHT_BIT  # what the rounding fixed


def test_fractional_timesteps_match_diffusers_euler_karras(v_model):
    options = karras("euler", round_timesteps=False)
    actual, expected = run_both(v_model, "EulerDiscreteScheduler", options)
    assert np.abs(actual - expected).max() <= EIGHT_BIT
