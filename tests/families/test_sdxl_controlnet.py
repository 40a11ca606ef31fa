"""SDXL ControlNet end to end against diffusers' StableDiffusionXLControlNetPipeline on the tiny SDXL model
(random weights, zero convolutions included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_fixtures import EIGHT_BIT, SIZE, UNET, as_float

import latentdiffusion as ld
from latentdiffusion.checkpoints.unet_keys import controlnet_from_diffusers
from latentdiffusion.config import ControlNetConfig
from latentdiffusion.models.controlnet import ControlNet

pytest.importorskip("diffusers")

HINT_CHANNELS = (16, 32)  # the tiny autoencoder downsamples 2x


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Small random changes to every weight, the zero convolutions included (as the family conftest's)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def controlnet(diffusers_sdxl):
    from diffusers import ControlNetModel

    base = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    theirs = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    randomise(theirs, 21)
    ours = ControlNet(ControlNetConfig(UNET, hint_channels=HINT_CHANNELS))
    ours.load_state_dict(controlnet_from_diffusers(theirs.state_dict()))
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize(
    "unit",
    [dict(strength=0.7, start=0.2, end=0.8), dict(strength=0.9, guess_mode=True)],
    ids=["window", "guess"],
)
def test_sdxl_controlnet_matches_diffusers(sdxl, diffusers_sdxl, controlnet, unit):
    import diffusers

    ours, _ = sdxl("base")
    base = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    theirs = diffusers.StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=controlnet[1])
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        theirs.scheduler.config, timestep_spacing="leading"
    )
    theirs.set_progress_bar_config(disable=True)
    hint = Image.fromarray(np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    start = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    prompts, negative = ["a red circle", "a blue square"], ["blurry", "ugly"]
    expected = theirs(
        prompts,
        image=hint,
        negative_prompt=negative,
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        guidance_scale=5.0,
        latents=start.clone(),
        controlnet_conditioning_scale=unit["strength"],
        control_guidance_start=unit.get("start", 0.0),
        control_guidance_end=unit.get("end", 1.0),
        guess_mode=unit.get("guess_mode", False),
        output_type="np",
    ).images
    images = ours.generate(
        prompts,
        negative_prompt=negative,
        width=SIZE,
        height=SIZE,
        steps=5,
        guidance_scale=5.0,
        sampler="euler",
        latents=start,
        control=[ld.Control(controlnet[0], hint, **unit)],
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT
    plain = ours.generate(
        prompts[:1],
        negative_prompt=negative[:1],
        width=SIZE,
        height=SIZE,
        steps=5,
        guidance_scale=5.0,
        sampler="euler",
        latents=start[:1],
    )
    assert np.abs(as_float(plain)[0] - as_float(images)[0]).max() > 2 / 255  # the control acts


def test_sdxl_controlnet_on_an_sd_model_is_one_clear_error(controlnet):
    from latentdiffusion.components import build_components
    from latentdiffusion.config import TINY
    from latentdiffusion.errors import UserError
    from latentdiffusion.pipelines.pipeline import Pipeline

    pipe = Pipeline(build_components(TINY))
    hint = Image.new("RGB", (32, 32))
    with pytest.raises(UserError, match="another base model") as error:
        pipe.generate("a cat", width=32, height=32, steps=2, control=[ld.Control(controlnet[0], hint)])
    assert "vector conditioning 1632" in str(error.value)
