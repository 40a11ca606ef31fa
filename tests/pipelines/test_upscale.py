"""x4 upscaling: parity with diffusers' StableDiffusionUpscalePipeline on a tiny random upscaler, the
sd-x4-upscaler preset against Stability AI's x4-upscaling.yaml, and tiled processing."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.config import PRESETS
from latentdiffusion.diffusion.noise import seeded_noise
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.upscale import (
    AUGMENT_SEED_OFFSET,
    LOW_RES_SCHEDULE,
    TiledDenoiser,
    is_upscaler,
    noise_augment,
)
from latentdiffusion.pipelines.vae_tiling import blend_tiles, tile_starts

EIGHT_BIT = 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def upscaler(tiny_model):
    return Pipeline(tiny_model("upscale").ours)


@pytest.fixture(scope="module")
def low_res() -> Image.Image:
    rng = np.random.default_rng(2)
    return Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_upscaling_matches_diffusers(upscaler, diffusers_pipeline, low_res, sampler):
    import diffusers

    theirs = diffusers_pipeline("StableDiffusionUpscalePipeline", "upscale")
    scheduler = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}[sampler]
    theirs.scheduler = scheduler.from_config(theirs.scheduler.config, timestep_spacing="leading")
    expected = theirs(
        ["a cat"],
        image=low_res,
        num_inference_steps=4,
        guidance_scale=6.0,
        noise_level=30,
        negative_prompt=["blurry"],
        generator=torch.Generator().manual_seed(5 + AUGMENT_SEED_OFFSET),  # the augmentation noise
        latents=seeded_noise((1, 4, 16, 24), [5]),  # the starting noise
        output_type="np",
    ).images
    images = upscaler.upscale(
        low_res, "a cat", "blurry", noise_level=30, steps=4, guidance_scale=6.0, sampler=sampler, seed=5
    )
    assert images[0].size == (96, 64)
    assert np.abs(np.asarray(images[0], dtype=np.float64) / 255 - expected[0]).max() <= EIGHT_BIT
    assert "Noise level: 30" in images[0].info["parameters"]


def test_noise_augmentation_is_diffusers_low_res_add_noise():
    from diffusers import DDPMScheduler

    low = LOW_RES_SCHEDULE
    scheduler = DDPMScheduler(
        beta_start=low.beta_start, beta_end=low.beta_end, beta_schedule=low.beta_schedule
    )
    images, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    expected = scheduler.add_noise(images, noise, torch.tensor([350]))
    torch.testing.assert_close(noise_augment(images, 350, noise), expected)


def test_preset_matches_the_original_x4_upscaling_config():
    """Stability AI's configs/stable-diffusion/x4-upscaling.yaml, transcribed."""
    config = PRESETS["sd-x4-upscaler"]
    unet, vae, schedule = config.unet, config.autoencoder, config.schedule
    assert is_upscaler(config)
    assert (unet.in_channels, unet.out_channels, unet.model_channels) == (7, 4, 256)
    assert (unet.channel_mult, unet.num_res_blocks, unet.num_heads) == ((1, 2, 2, 4), 2, 8)
    assert unet.attention_levels == (1, 2, 3)  # attention_resolutions [2, 4, 8]
    assert unet.only_cross_attention == (True, True, True, False)  # disable_self_attentions
    assert (unet.num_class_embeds, unet.context_dim, unet.use_linear_projection) == (1000, 1024, True)
    assert (vae.block_channels, vae.num_res_blocks, vae.scaling_factor) == ((128, 256, 512), 2, 0.08333)
    assert (schedule.beta_start, schedule.beta_end, schedule.beta_schedule) == (0.0001, 0.02, "scaled_linear")
    assert schedule.prediction_type == "v_prediction"  # parameterization: "v"
    text = config.text_encoder  # FrozenOpenCLIPEmbedder, layer "penultimate"
    assert (text.hidden_size, text.num_layers, text.skip_last_layers, text.activation) == (
        1024,
        24,
        1,
        "gelu",
    )


def test_tile_starts_cover_the_input():
    assert tile_starts(20, 32, 8) == [0]
    assert tile_starts(80, 32, 8) == [0, 24, 48]
    for length in range(32, 200, 8):
        starts = tile_starts(length, 32, 8)
        assert starts[-1] + 32 == length
        assert all(b - a <= 24 for a, b in itertools.pairwise(starts))


def test_blending_tiles_of_a_local_function_is_exact():
    x = torch.randn(2, 3, 40, 56)

    def run(top, left, h, w):
        crop = x[..., top : top + h, left : left + w]
        return torch.nn.functional.interpolate(crop, scale_factor=4, mode="nearest") * 2

    expected = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest") * 2
    torch.testing.assert_close(blend_tiles(run, (40, 56), 16, 8, 4), expected)


def test_tiled_denoiser_crops_concat_and_passes_other_conditions():
    def denoiser(x, sigma, concat, context, class_labels):  # pointwise, so tiles cannot change it
        return (
            x * concat[:, :1]
            + context.mean()
            + class_labels[:, None, None, None]
            - sigma[:, None, None, None]
        )

    x, concat = torch.randn(2, 4, 24, 40), torch.randn(2, 3, 24, 40)
    cond = {"concat": concat, "context": torch.randn(2, 5, 8), "class_labels": torch.tensor([20, 30])}
    sigma = torch.tensor([1.5, 1.5])
    tiled = TiledDenoiser(denoiser, 16, 8)(x, sigma, **cond)
    torch.testing.assert_close(tiled, denoiser(x, sigma, **cond))


def test_large_inputs_run_in_tiles(upscaler):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    shapes = []
    result = upscaler.upscale(
        image, "x", steps=1, tile_size=32, tile_overlap=8, callback=lambda i, n, x, x0: shapes.append(x.shape)
    )[0]
    assert result.size == (192, 160)
    assert shapes == [(1, 4, 40, 48)]  # the sampler sees one whole latent
    assert np.asarray(result).std() > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"noise_level": 351}, "noise_level must be"),
        ({"noise_level": 2.5}, "noise_level must be"),
        ({"tile_size": 20}, "tile size"),
        ({"tile_size": 32, "tile_overlap": 32}, "tile overlap"),
    ],
)
def test_bad_upscale_settings(upscaler, low_res, settings, message):
    with pytest.raises(UserError, match=message):
        upscaler.upscale(low_res, "x", steps=1, **settings)


def test_an_upscaler_can_serve_another_pipeline(tiny_model, upscaler, low_res):
    base = Pipeline(tiny_model("sd").ours)
    image = base.upscale(low_res, "x", steps=1, upscaler=upscaler)[0]
    assert image.size == (96, 64)
    assert "Upscaler: tiny-upscaler" in image.info["parameters"]


def test_guidance_defaults_to_the_upscaler_models_own(monkeypatch):
    from dataclasses import replace

    import latentdiffusion.pipelines.upscale as upscale_module
    from latentdiffusion.components import build_components
    from latentdiffusion.config import get_preset
    from latentdiffusion.pipelines.pipeline import Pipeline

    seen = []
    monkeypatch.setattr(
        upscale_module,
        "upscale",
        lambda model, image, request, **k: seen.append(request.options) or [Image.new("RGB", (32, 32))],
    )
    preset = get_preset("sd-x4-upscaler")
    tiny = replace(
        preset, unet=replace(preset.unet, model_channels=32, channel_mult=(1,), attention_levels=())
    )
    pipe = Pipeline(build_components(replace(tiny, default_guidance_scale=2.5)))
    pipe.upscale(Image.new("RGB", (8, 8)), "x")
    pipe.upscale(Image.new("RGB", (8, 8)), "x", guidance_scale=4.0)
    assert [o.guidance_scale for o in seen] == [2.5, 4.0]
