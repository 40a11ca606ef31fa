"""Tiny random-weight SD3 / SD3.5 models in the real layouts: three text encoders of different widths
(CLIP-L 32, bigG 48, T5 96, as diffusers' own readers confuse equal ones), a two-block MMDiT over
16-channel latents, and a 16-channel autoencoder without quant convolutions."""

from __future__ import annotations

from dataclasses import replace

from latentdiffusion.config import PRESETS, AutoencoderConfig, MMDiTConfig, T5Config, TextEncoderConfig

SIZE = 32  # image side of the parity tests (a multiple of the autoencoder's 2x and the 2x2 patches)
CLIP_L = TextEncoderConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    context_from_penultimate=True,
    projection_dim=32,
)
BIG_G = TextEncoderConfig(
    hidden_size=48,
    num_layers=3,
    num_heads=2,
    intermediate_size=96,
    activation="gelu",
    pad_token_id=0,
    context_from_penultimate=True,
    projection_dim=40,
)
T5 = T5Config(hidden_size=96, head_dim=16, num_heads=4, intermediate_size=128, num_layers=2)
TRANSFORMER = MMDiTConfig(
    depth=2,
    num_heads=2,
    head_dim=16,
    context_dim=96,  # T5's width; the CLIP states (32 + 48) are zero-padded to it
    pooled_dim=32 + 40,
    pos_embed_max_size=16,
    sample_size=16,
)
AUTOENCODER = AutoencoderConfig(
    block_channels=(32, 32),
    num_res_blocks=1,
    latent_channels=16,
    use_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)
TINY_SD3 = replace(
    PRESETS["sd3-medium"],
    name="tiny-sd3",
    transformer=TRANSFORMER,
    autoencoder=AUTOENCODER,
    text_encoder=CLIP_L,
    text_encoder_2=BIG_G,
    text_encoder_3=T5,
    sample_size=SIZE,
)
# SD3.5: RMS-normalised queries and keys, and (Medium) the MMDiT-X second attention in the first block
TINY_SD35 = replace(
    TINY_SD3,
    name="tiny-sd35",
    transformer=replace(TRANSFORMER, qk_norm="rms_norm", dual_attention_layers=(0,)),
)
TINY_SD3_WITHOUT_T5 = replace(TINY_SD3, name="tiny-sd3-no-t5", text_encoder_3=None)
# Four blocks, so skip-layer guidance can leave out middle ones (SD3.5 Medium skips 7, 8, 9 of 24)
TINY_SD35_DEEP = replace(
    TINY_SD35, name="tiny-sd35-deep", transformer=replace(TINY_SD35.transformer, depth=4)
)
