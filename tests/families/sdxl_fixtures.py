"""Tiny random-weight SDXL models in the real layouts: two text encoders of different widths (64 and
128, as diffusers' own readers confuse equal ones), a three-level U-Net with no attention at full
resolution and deeper transformers below, 256-wide micro-conditioning embeddings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from latentdiffusion.config import PRESETS, AutoencoderConfig, TextEncoderConfig, UNetConfig

SIZE = 64  # image side of the parity tests
EIGHT_BIT = 1 / 255 + 1e-6  # our images are 8-bit, diffusers' float: one rounding step at most
SCHEDULERS = {  # our sampler -> the diffusers scheduler the parity tests compare it with
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


def as_float(images) -> np.ndarray:
    """PIL images -> [N, H, W, 3] in [0, 1], as diffusers' output_type="np"."""
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


CLIP_L = TextEncoderConfig(
    hidden_size=64, num_layers=3, num_heads=1, intermediate_size=128, context_from_penultimate=True
)
BIG_G = TextEncoderConfig(
    hidden_size=128,
    num_layers=4,
    num_heads=2,
    intermediate_size=256,
    activation="gelu",
    pad_token_id=0,
    context_from_penultimate=True,
    projection_dim=96,
)
UNET = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=64,
    transformer_depths=(0, 1, 2),
    context_dim=64 + 128,
    use_linear_projection=True,
    adm_in_channels=96 + 6 * 256,
)
AUTOENCODER = AutoencoderConfig(block_channels=(32, 64), num_res_blocks=1, scaling_factor=0.13025)
TINY_SDXL = replace(
    PRESETS["sdxl"],
    name="tiny-sdxl",
    unet=UNET,
    autoencoder=AUTOENCODER,
    text_encoder=CLIP_L,
    text_encoder_2=BIG_G,
    sample_size=64,
)
TINY_REFINER = replace(
    PRESETS["sdxl-refiner"],
    name="tiny-sdxl-refiner",
    unet=replace(
        UNET, model_channels=64, transformer_depths=(0, 2, 1), context_dim=128, adm_in_channels=96 + 5 * 256
    ),
    autoencoder=AUTOENCODER,
    text_encoder_2=BIG_G,
    sample_size=64,
)
TINY_INPAINT = replace(TINY_SDXL, name="tiny-sdxl-inpaint", unet=replace(UNET, in_channels=9))
