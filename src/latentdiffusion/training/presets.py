"""Named training presets: one literal dict of complete :class:`TrainConfig` values, the starting point
that ``ldm train --preset NAME`` (and ``train-autoencoder``, ``train-upscaler``, ``train-preview``)
changes field by field with overrides (``training.config.apply_overrides``).

The ``shapes*`` presets are the default model's recipes; docs/default-model.md records how each was
chosen and the runs behind the shipped files. Like ``training.config``, no torch import.
"""

from __future__ import annotations

from typing import Any

from latentdiffusion.config import SHAPES, TINY, ModelConfig, TextEncoderConfig, UNetConfig, get_preset
from latentdiffusion.errors import UserError
from latentdiffusion.training.config import (
    AutoencoderLossConfig,
    DataConfig,
    DiffusionLossConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)

SHAPES_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square in the top left on a black background",
    "a small white triangle in the bottom right on a green background",
    "a blue square left of a orange circle on a white background",
    "a purple triangle above a yellow circle on a gray background",
    "a green circle in the center on a red background",
)

_TINY_COMMON: dict[str, Any] = {
    "model": TINY,
    "data": DataConfig(resolution=32, holdout=4),
    "optim": OptimConfig(lr=1e-3, warmup_steps=2),
    "sample": SampleConfig(prompts=("a red circle on a blue background",), steps=2),
    "batch_size": 2,
    "max_steps": 4,
    "ema_decay": 0.9,
    "log_every": 1,
    "checkpoint_every": 2,
}

# The shipped x4 upscaler of the default model's world (`ldm train-upscaler`, training.upscaler): 16x16
# RGB -> 64x64 through the default model's frozen f=4 autoencoder. The U-Net has the SD x4 upscaler's form
# (latent + low-resolution image channels, a class embedding for the augmentation noise levels 0-350,
# v-prediction on its schedule) at a size whose fp16 folder stays under 12 MB, and its own small text
# encoder (trained jointly), so that it does not depend on the default model's text encoder.
SHAPES_UPSCALER = ModelConfig(
    name="shapes-upscaler",
    unet=UNetConfig(
        in_channels=SHAPES.autoencoder.latent_channels + 3,
        model_channels=48,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(2,),
        num_heads=4,
        context_dim=32,
        num_class_embeds=351,  # noise levels 0..MAX_NOISE_LEVEL of pipelines.upscale
        norm_groups=16,
    ),
    autoencoder=SHAPES.autoencoder,
    text_encoder=TextEncoderConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, max_length=32
    ),
    schedule=get_preset("sd-x4-upscaler").schedule,
    sample_size=64,
    # Measured on held-out images (20 steps, noise level 20): PSNR 25.2 dB at guidance 1-3, 22.7 dB at 7.5,
    # where strong text guidance pulls colours and shapes away from the low-resolution input.
    default_guidance_scale=1.0,
)

NEVER = 2**62  # a step count no run reaches (e.g. disc_start: no GAN)

PRESETS: dict[str, TrainConfig] = {
    "tiny-autoencoder": TrainConfig(
        name="tiny-autoencoder",
        task="autoencoder",
        autoencoder_loss=AutoencoderLossConfig(disc_start=2, disc_channels=8, disc_layers=2),
        **_TINY_COMMON,
    ),
    "tiny": TrainConfig(name="tiny", task="diffusion", autoencoder="random", **_TINY_COMMON),
    "shapes-autoencoder": TrainConfig(
        name="shapes-autoencoder",
        task="autoencoder",
        model=SHAPES,
        optim=OptimConfig(lr=4e-4, warmup_steps=200, min_lr_ratio=0.1),
        autoencoder_loss=AutoencoderLossConfig(disc_start=2500, disc_channels=32, disc_layers=2),
        sample=SampleConfig(every=500),
        batch_size=8,
        max_steps=4000,
        ema_decay=0.999,
        eval_every=500,
        checkpoint_every=500,
    ),
    # The first stage redrawn with sharp edges and flat fills (docs/default-model.md, "A sharper first
    # stage"):
    # the `shapes-autoencoder` run's export continued (--init) with L1 weighted 5x within 1 px of edges and
    # an image-gradient L1, no GAN (its texture is what flat fills must not have), a short EMA. The shipped
    # first stage of data/default continued this run's export 400 steps more (--max_steps=400
    # --optim.lr=1e-4), then 3000 more (--optim.lr=2e-4 --ema_decay=0.999; docs/default-model.md).
    "shapes-autoencoder-v2": TrainConfig(
        name="shapes-autoencoder-v2",
        task="autoencoder",
        model=SHAPES,
        optim=OptimConfig(lr=2e-4, warmup_steps=100, min_lr_ratio=0.1),
        autoencoder_loss=AutoencoderLossConfig(
            edge_weight=4.0,
            edge_radius=1,
            gradient_weight=1.0,
            disc_start=NEVER,
            disc_channels=32,
            disc_layers=2,
        ),
        sample=SampleConfig(every=500),
        batch_size=8,
        max_steps=1000,
        ema_decay=0.995,
        eval_every=500,
        checkpoint_every=100,
    ),
    "shapes": TrainConfig(
        name="shapes",
        task="diffusion",
        model=SHAPES,
        # three of four scenes relational: binding two objects to their sides is the hardest thing to learn
        data=DataConfig(caption_dropout=0.1, shapes_relational_fraction=0.75),
        optim=OptimConfig(lr=5e-4, warmup_steps=500, min_lr_ratio=0.1),
        # plain v-loss: its x0 weight SNR + 1 never drops below 1, so the high-noise steps where the layout
        # is decided count (min-SNR weighting would scale them by SNR ~ 0); no offset noise under zero SNR;
        # timesteps shifted towards high noise (half above t = 750), where which object goes where is decided
        diffusion=DiffusionLossConfig(min_snr_gamma=None, offset_noise=0.0, timestep_shift=3.0),
        sample=SampleConfig(every=1000, prompts=SHAPES_PROMPTS),
        batch_size=32,
        max_steps=6000,
        ema_decay=0.999,
        eval_every=1000,
        checkpoint_every=500,
    ),
    "shapes-upscaler": TrainConfig(
        name="shapes-upscaler",
        task="upscaler",
        model=SHAPES_UPSCALER,
        autoencoder="default",
        data=DataConfig(caption_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1),
        diffusion=DiffusionLossConfig(min_snr_gamma=5.0),
        # the grid shows held-out images (not prompts) at the settings `ldm upscale` uses by default
        sample=SampleConfig(every=600, prompts=(), guidance_scale=1.0),
        batch_size=32,
        max_steps=1800,  # ~19 min on 2 idle cores (1 loaded core: 30 images/s; x1.7 for 2 cores)
        ema_decay=0.995,  # a short run: average over the last ~200 steps, not ~1000
        eval_every=600,
        checkpoint_every=300,
    ),
    # The default model's progress-preview decoder (`ldm train-preview`, training.preview): a 0.1 M
    # convolutional decoder distilled from the frozen autoencoder of "default" (about 5 minutes).
    "shapes-preview": TrainConfig(
        name="shapes-preview",
        task="preview",
        model=SHAPES,
        autoencoder="default",
        optim=OptimConfig(lr=2e-3, warmup_steps=50, min_lr_ratio=0.05),
        sample=SampleConfig(every=250),
        batch_size=32,
        max_steps=1000,
        ema_decay=0.99,
        eval_every=250,
        checkpoint_every=250,
    ),
}


def get_train_preset(name: str, task: str | None = None) -> TrainConfig:
    """The preset called ``name``; with ``task`` given, it must be a preset of that task."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise UserError(f"unknown training preset {name!r}; known: {', '.join(PRESETS)}") from None
    if task is not None and config.task != task:
        matching = ", ".join(n for n, c in PRESETS.items() if c.task == task)
        raise UserError(f"preset {name!r} trains the {config.task}, not the {task}; use one of: {matching}")
    return config
