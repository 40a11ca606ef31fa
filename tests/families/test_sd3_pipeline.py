"""SD3 / SD3.5 end to end against diffusers' StableDiffusion3Pipeline on tiny random models: guided
text-to-image with flow-matching Euler and DPM++ 2M, with and without T5, and img2img."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sd3_fixtures import SIZE, TINY_SD3, TINY_SD3_WITHOUT_T5, TINY_SD35
from sdxl_fixtures import EIGHT_BIT, as_float

from latentdiffusion.pipelines.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on a blue background", "a large yellow square"]
NEGATIVES = ["", "blurry"]


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 16, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


class FractionalTimesteps(diffusers.DPMSolverMultistepScheduler):
    """diffusers' flow-matching DPM-Solver++ 2M, feeding the network t * 1000 unrounded as FlowMatchEuler
    does (and as we do for every flow sampler): the stock scheduler truncates those timesteps to whole
    numbers, which the parity check of the samplers (tests/samplers/test_flow_samplers.py) isolates."""

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps


def dpm_solver(pipe) -> None:
    pipe.scheduler = FractionalTimesteps(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    )


@pytest.mark.parametrize(
    ("config", "sampler"),
    [(TINY_SD3, "euler"), (TINY_SD3, "dpmpp_2m"), (TINY_SD35, "euler"), (TINY_SD3_WITHOUT_T5, "euler")],
    ids=lambda v: getattr(v, "name", v),
)
def test_guided_generation_matches_diffusers(sd3_models, diffusers_sd3, config, sampler):
    components, _ = sd3_models(config)
    theirs = diffusers_sd3(config)
    if sampler == "dpmpp_2m":
        dpm_solver(theirs)
    start = latents(2, 3)
    expected = theirs(
        PROMPTS,
        negative_prompt=NEGATIVES,
        height=SIZE,
        width=SIZE,
        num_inference_steps=6,
        guidance_scale=5.0,
        latents=start.clone(),
        output_type="np",
    ).images
    images = Pipeline(components).generate(
        PROMPTS,
        negative_prompt=NEGATIVES,
        width=SIZE,
        height=SIZE,
        steps=6,
        guidance_scale=5.0,
        sampler=sampler,
        latents=start,
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


@pytest.mark.parametrize("config", [TINY_SD3, TINY_SD35], ids=lambda c: c.name)
def test_img2img_matches_diffusers(sd3_models, diffusers_sd3, config):
    components, _ = sd3_models(config)
    theirs = diffusers_sd3(config, "StableDiffusion3Img2ImgPipeline")
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE))
    expected = theirs(
        PROMPTS,
        image=[picture, picture],  # this pipeline takes one image per prompt with a list of generators
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=NEGATIVES,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        output_type="np",
    ).images
    images = Pipeline(components).img2img(
        picture, PROMPTS, NEGATIVES, strength=0.6, steps=5, guidance_scale=5.0, sampler="euler", seed=7
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def test_turbo_setting_few_steps_without_guidance_matches_diffusers(sd3_models, diffusers_sd3):
    """SD3.5 Large Turbo's setting: 4 steps, guidance 1 (the conditional side alone, no negative pass)."""
    components, _ = sd3_models(TINY_SD35)
    theirs = diffusers_sd3(TINY_SD35)
    start = latents(2, 5)
    expected = theirs(
        PROMPTS,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=1.0,
        latents=start.clone(),
        output_type="np",
    ).images
    images = Pipeline(components).generate(
        PROMPTS, width=SIZE, height=SIZE, steps=4, guidance_scale=1.0, sampler="euler", latents=start
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT
