"""A model loaded with a tiny autoencoder (TAESD): images equal diffusers' StableDiffusionPipeline with
``vae=AutoencoderTiny(...)``, img2img encodes with it, previews come from it, misfits are refused."""

import numpy as np
import pytest
import torch

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_pipeline
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.tiny_vae import has_tiny_autoencoder, use_tiny_autoencoder

SIZE = 32


def random_tiny(latent_channels: int = 4, stages: int = 2, seed: int = 7):
    """A diffusers AutoencoderTiny with the tiny test model's latent factor (2 for two stages)."""
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny(
        encoder_block_out_channels=(8,) * stages,
        decoder_block_out_channels=(8,) * stages,
        num_encoder_blocks=(1,) * stages,
        num_decoder_blocks=(1,) * stages,
        latent_channels=latent_channels,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.12)  # keeps images in range
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd")
    model = random_tiny()
    model.save_pretrained(folder)
    return model, folder


def diffusers_with(tiny_model, vae):
    import diffusers
    from tests.pipelines.conftest import ddim_scheduler

    model = tiny_model("sd")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=ddim_scheduler(model.ours.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_images_match_diffusers_with_autoencoder_tiny(tiny_model, tiny):
    vae, folder = tiny
    ours = Pipeline(use_tiny_autoencoder(tiny_model("sd").ours, folder))
    assert has_tiny_autoencoder(ours.components) and not has_tiny_autoencoder(tiny_model("sd").ours)
    theirs = diffusers_with(tiny_model, vae)
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a blue square"]
    expected = theirs(
        prompts,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=latents.clone(),
        output_type="np",
    ).images
    images = ours.generate(
        prompts, width=SIZE, height=SIZE, steps=4, guidance_scale=5.0, sampler="ddim", latents=latents
    )
    actual = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_img2img_encodes_and_previews_decode_with_the_tiny_autoencoder(tiny_model, tiny):
    vae, folder = tiny
    ours = Pipeline(use_tiny_autoencoder(tiny_model("sd").ours, folder))
    image = ours.generate("a cat", width=SIZE, height=SIZE, steps=2, sampler="ddim")[0]
    seen = []
    out = ours.img2img(
        image, "a cat", strength=0.5, steps=4, sampler="ddim", preview=lambda i, n, imgs: seen.append(imgs)
    )
    assert out[0].size == (SIZE, SIZE) and len(seen) == 2 and seen[0][0].size == (SIZE, SIZE)
    # the preview of the last step is the tiny decoder's image of that step's x0
    final_x0 = []
    ours.img2img(
        image,
        "a cat",
        strength=0.5,
        steps=4,
        sampler="ddim",
        callback=lambda i, n, x, x0: final_x0.append(x0),
    )
    with torch.no_grad():
        decoded = vae.decode(final_x0[-1]).sample
    expected = ((decoded.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(seen[-1][0], dtype=np.float64) - expected).max() <= 1


def test_load_option_and_refusals(tmp_path, tiny):
    _, folder = tiny
    pipe = load_pipeline("preset:tiny", tiny_vae=folder)
    assert has_tiny_autoencoder(pipe.components)
    with pytest.raises(UserError, match="cannot be saved"):
        pipe.save(tmp_path / "saved")
    sd3_style = random_tiny(latent_channels=16)
    sd3_style.save_pretrained(tmp_path / "taesd3")
    with pytest.raises(UserError, match=r"16-channel latents .* 4-channel ones: use taesd"):
        load_pipeline("preset:tiny", tiny_vae=tmp_path / "taesd3")
    eight = random_tiny(stages=4)
    eight.save_pretrained(tmp_path / "f8")
    with pytest.raises(UserError, match="scales images by"):
        load_pipeline("preset:tiny", tiny_vae=tmp_path / "f8")
