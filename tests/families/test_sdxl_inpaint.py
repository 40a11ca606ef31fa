"""SDXL inpainting against diffusers' StableDiffusionXLInpaintPipeline on tiny random models: a 9-channel
inpainting U-Net (latent + mask + masked-image latent) and the base model by re-noising the known region."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_fixtures import EIGHT_BIT, SCHEDULERS, SIZE, as_float

from latentdiffusion.families import MicroConditioning

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))  # on the latent grid (factor 2), where latent cells are whole
    return mask


def theirs_inpaint(diffusers_sdxl, kind: str, sampler: str):
    import diffusers

    pipe = diffusers_sdxl(kind, "StableDiffusionXLInpaintPipeline")
    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    return pipe


@pytest.mark.parametrize(
    ("kind", "sampler", "strength"),
    [
        ("inpaint", "ddim", 1.0),
        ("inpaint", "euler", 1.0),
        ("inpaint", "dpmpp_2m", 0.7),
        ("base", "euler", 1.0),
        ("base", "dpmpp_2m", 0.7),
    ],
)
def test_inpainting_matches_diffusers(sdxl, diffusers_sdxl, picture, mask, kind, sampler, strength):
    """One prompt: diffusers' SDXL inpainting draws every image's posterior sample from the first
    generator, so only a batch of one pairs its draws with ours."""
    ours, _ = sdxl(kind)
    theirs = theirs_inpaint(diffusers_sdxl, kind, sampler)
    micro = {"original_size": (256, 256), "crops_coords_top_left": (8, 0)}
    expected = theirs(
        "a cat",
        image=picture,
        mask_image=mask,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
        **micro,
    ).images
    images = ours.inpaint(
        picture,
        mask,
        "a cat",
        "blurry",
        strength=strength,
        steps=5,
        guidance_scale=5.0,
        sampler=sampler,
        seed=3,
        mask_blur=0,
        paste_back=False,
        conditioning=MicroConditioning(**micro),
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def test_inpainting_from_given_latents_matches_diffusers(sdxl, diffusers_sdxl, picture, mask):
    """Strength 1: ``latents`` is the starting noise, as diffusers' ``latents`` (scaled by its
    init_noise_sigma); the masked image's posterior sample is then the generator's first draw in both."""
    ours, _ = sdxl("inpaint")
    theirs = theirs_inpaint(diffusers_sdxl, "inpaint", "euler")
    start = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(8))
    settings = {"strength": 1.0, "guidance_scale": 4.0, "negative_prompt": "dark"}
    expected = theirs(
        "a dog",
        image=picture,
        mask_image=mask,
        num_inference_steps=4,
        height=SIZE,
        width=SIZE,
        latents=start.clone(),
        generator=[torch.Generator().manual_seed(2)],
        output_type="np",
        **settings,
    ).images
    unblended = {"mask_blur": 0, "paste_back": False}
    images = ours.inpaint(
        picture, mask, "a dog", steps=4, sampler="euler", seed=2, latents=start, **unblended, **settings
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def test_sdxl_inpainting_model_redraws_everything_in_img2img(sdxl, picture):
    """img2img on a 9-channel model is inpainting under an all-white mask."""
    ours, _ = sdxl("inpaint")
    image = ours.img2img(picture, "x", strength=0.5, steps=2, seed=1)[0]
    assert image.size == picture.size
    assert "Denoising strength: 0.5" in image.info["parameters"]
