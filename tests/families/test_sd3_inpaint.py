"""SD3 inpainting through the family-generic 16-channel path (re-noise and blend the known region)
against diffusers' StableDiffusion3InpaintPipeline on tiny random models, and outpainting on SD3.

diffusers 0.42's SD3 inpainting pipeline decodes its latent as ``latent / scale`` and leaves out the
autoencoder's shift (0.0609), which its own text-to-image and img2img pipelines add back (and which it
subtracts when it encodes the image), so its decoded pixels are off by the shift. The parity test takes
its final latent and decodes it as StableDiffusion3Pipeline does, ``latent / scale + shift``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sd3_fixtures import SIZE, TINY_SD3, TINY_SD35
from sdxl_fixtures import EIGHT_BIT, as_float

from latentdiffusion.pipelines.image_to_image import strength_steps
from latentdiffusion.pipelines.images import extend_canvas
from latentdiffusion.pipelines.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 4, 24, 32))  # on the latent grid (2x down), across two patches
    return mask


@pytest.mark.parametrize(
    ("config", "strength"),
    [(TINY_SD3, 1.0), (TINY_SD3, 0.7), (TINY_SD35, 0.6)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_inpainting_matches_diffusers(sd3_models, diffusers_sd3, picture, mask, config, strength):
    components, _ = sd3_models(config)
    theirs = diffusers_sd3(config, "StableDiffusion3InpaintPipeline")
    expected = theirs(
        ["a red circle", "a blue square"],
        image=[picture, picture],  # one image per prompt: each is encoded with its own generator
        mask_image=mask,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=["", "blurry"],
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="latent",
    ).images
    expected = decode(theirs, expected)
    images = Pipeline(components).inpaint(
        picture,
        mask,
        ["a red circle", "a blue square"],
        ["", "blurry"],
        strength=strength,
        steps=5,
        guidance_scale=5.0,
        sampler="euler",
        seed=3,
        mask_blur=0,
        paste_back=False,
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """diffusers' latents -> [N, H, W, 3] in [0, 1] as StableDiffusion3Pipeline decodes them."""
    vae = pipe.vae
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="np")


@pytest.mark.parametrize("strength", [0.7, 0.3])
def test_img2img_counts_strength_steps_as_diffusers(sd3_models, diffusers_sd3, picture, strength):
    """SD3's pipelines skip ``int(steps - steps * strength)`` steps (4 of 5 run at 0.7, where SD's
    ``int(steps * strength)`` runs 3); img2img and inpainting share the count."""
    components, _ = sd3_models(TINY_SD3)
    theirs = diffusers_sd3(TINY_SD3, "StableDiffusion3Img2ImgPipeline")
    expected = theirs(
        "a red circle",
        image=picture,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(5)],
        output_type="np",
    ).images
    images = Pipeline(components).img2img(
        picture, "a red circle", strength=strength, steps=5, guidance_scale=5.0, sampler="euler", seed=5
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def test_strength_steps_equal_diffusers_get_timesteps(diffusers_sd3):
    pipe = diffusers_sd3(TINY_SD3, "StableDiffusion3Img2ImgPipeline")
    for steps in range(1, 13):
        for strength in (0.05, 0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0):
            pipe.scheduler.set_timesteps(steps)
            timesteps, _ = pipe.get_timesteps(steps, strength, "cpu")
            assert strength_steps(steps, strength, "flow") == len(timesteps), (steps, strength)
    assert strength_steps(5, 0.7, "discrete") == 3
    assert strength_steps(5, 0.7, "flow") == 4


def test_outpainting_runs_and_keeps_the_image(sd3_models, picture):
    components, _ = sd3_models(TINY_SD3)
    images = Pipeline(components).outpaint(
        picture, "a red circle", left=8, bottom=16, steps=2, guidance_scale=3.0, mask_blur=1, seed=1
    )
    assert images[0].size == (SIZE + 8, SIZE + 16)
    result = np.asarray(images[0], dtype=np.int16)
    inner = result[: SIZE - 3, 8 + 3 :]  # away from the feathered seam
    assert np.array_equal(inner, np.asarray(picture, dtype=np.int16)[: SIZE - 3, 3:])
    start = np.asarray(extend_canvas(picture, 8, 0, 0, 16), dtype=np.int16)  # edge pixels stretched out
    assert np.abs(result[:, :5] - start[:, :5]).mean() > 5  # the new area was repainted
