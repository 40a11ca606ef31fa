"""An inpaint ControlNet's masked hint (preprocessor "inpaint"): the inpainting's image with the masked
pixels set to -1, made from the pipeline's own image and mask; parity with diffusers'
StableDiffusionControlNetInpaintPipeline given that hint as its control image (its examples' recipe)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import latentdiffusion as ld
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline

from .conftest import ddim_scheduler

# the tiny model's ControlNets (ours and diffusers', same random weights) and helpers
from .test_controlnet_pipeline import SIZE, controlnets, hint  # noqa: F401


def masked_hint(picture: Image.Image, mask: Image.Image) -> torch.Tensor:
    """diffusers' example recipe: the image in [0, 1], pixels where the mask is > 0.5 set to -1."""
    image = np.asarray(picture, dtype=np.float32) / 255.0
    image[np.asarray(mask, dtype=np.float32) / 255.0 > 0.5] = -1.0
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def the_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 32))
    return mask


@pytest.mark.parametrize("invert", [False, True])
def test_inpaint_controlnet_hint_matches_diffusers(tiny_model, controlnets, invert):  # noqa: F811
    import diffusers

    model = tiny_model("sd")
    theirs = diffusers.StableDiffusionControlNetInpaintPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        controlnet=controlnets[0][1],
        scheduler=ddim_scheduler(model.ours.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    picture, mask = hint(50), the_mask()
    repainted = ImageOps.invert(mask) if invert else mask  # what diffusers is given: white = repaint
    expected = theirs(
        ["a cat"],
        image=picture,
        mask_image=repainted,
        control_image=masked_hint(picture, repainted),
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=["blurry"],
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(3)],
        controlnet_conditioning_scale=1.0,  # its default here is 0.5
        output_type="np",
    ).images
    unit = ld.Control(controlnets[0][0], None, preprocessor="inpaint")
    images = Pipeline(model.ours).inpaint(
        picture,
        mask,
        "a cat",
        "blurry",
        steps=5,
        guidance_scale=5.0,
        sampler="ddim",
        seed=3,
        mask_blur=0,
        paste_back=False,
        invert_mask=invert,
        control=[unit],
    )
    actual = np.asarray(images[0], dtype=np.float64)[None] / 255
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_inpaint_hint_needs_a_mask_outside_inpainting(tiny_model, controlnets):  # noqa: F811
    unit = ld.Control(controlnets[0][0], hint(1), preprocessor="inpaint")
    with pytest.raises(UserError, match="inpaint preprocessor needs the mask"):
        Pipeline(tiny_model("sd").ours).generate("a cat", width=SIZE, height=SIZE, steps=1, control=[unit])
