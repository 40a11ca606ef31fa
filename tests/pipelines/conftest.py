"""Tiny random models shared by the pipeline tests: ours and diffusers' holding the same weights.

``tiny_model(kind)`` builds (once per session) a text-to-image model ("sd"), a 9-channel inpainting
model ("inpaint") or an x4-upscaler-shaped model ("upscale", SD 2 style text encoder, 3-level autoencoder
with scale 0.08333): our ``Components`` plus the diffusers / transformers modules and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from latentdiffusion.checkpoints.autoencoder_keys import from_diffusers_state_dict as vae_from_diffusers
from latentdiffusion.checkpoints.text_encoder_keys import from_hf_state_dict
from latentdiffusion.checkpoints.unet_keys import from_diffusers_state_dict as unet_from_diffusers
from latentdiffusion.components import Components, build_components
from latentdiffusion.config import (
    PRESETS,
    TINY,
    AutoencoderConfig,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
)

SIZE = 32  # image side of the parity tests


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms and biases included, so that no default value hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1) * 1.0)


@dataclass
class TinyModel:
    ours: Components
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer


UPSCALER = replace(
    PRESETS["sd-x4-upscaler"],
    name="tiny-upscaler",
    unet=UNetConfig(
        in_channels=7,
        model_channels=32,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_levels=(1, 2),
        num_heads=2,
        context_dim=32,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=1000,
    ),
    autoencoder=AutoencoderConfig(block_channels=(32, 32, 64), num_res_blocks=1, scaling_factor=0.08333),
    text_encoder=TextEncoderConfig(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, activation="gelu", pad_token_id=0
    ),
    sample_size=128,
)

CONFIGS: dict[str, ModelConfig] = {
    "sd": TINY,
    "inpaint": replace(TINY, name="tiny-inpaint", unet=replace(TINY.unet, in_channels=9)),
    "upscale": UPSCALER,
}


def diffusers_unet(config: UNetConfig) -> Any:
    from diffusers import UNet2DConditionModel

    levels = len(config.channel_mult)
    down = tuple(
        "CrossAttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in range(levels)
    )
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=config.num_heads,
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=list(config.only_cross_attention) or False,
        num_class_embeds=config.num_class_embeds,
    )


def diffusers_vae(config: AutoencoderConfig) -> Any:
    from diffusers import AutoencoderKL

    levels = len(config.block_channels)
    return AutoencoderKL(
        block_out_channels=config.block_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        scaling_factor=config.scaling_factor,
    )


def hf_text_encoder(config: TextEncoderConfig) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_length,
            hidden_act=config.activation,
            vocab_size=config.vocab_size,
        )
    )


def build_tiny(config: ModelConfig, folder) -> TinyModel:
    from transformers import CLIPTokenizer

    unet, vae, text = (
        diffusers_unet(config.unet),
        diffusers_vae(config.autoencoder),
        hf_text_encoder(config.text_encoder),
    )
    for i, module in enumerate((unet, vae, text)):
        randomise(module, i)
    ours = build_components(config)
    ours.unet.load_state_dict(unet_from_diffusers(unet.state_dict()))
    ours.autoencoder.load_state_dict(vae_from_diffusers(vae.state_dict()))
    ours.text_encoder.load_state_dict(from_hf_state_dict(text.state_dict()))
    ours.tokenizer.save(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return TinyModel(ours, unet.eval(), vae.eval(), text.eval(), tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(kind)`` -> TinyModel, built once per session and kind."""
    cache: dict[str, TinyModel] = {}

    def get(kind: str) -> TinyModel:
        if kind not in cache:
            cache[kind] = build_tiny(CONFIGS[kind], tmp_path_factory.mktemp(f"tokenizer-{kind}"))
        return cache[kind]

    return get


def ddim_scheduler(config: ModelConfig) -> Any:
    """diffusers' DDIMScheduler with the schedule of ``config`` (what the parity tests start from)."""
    from diffusers import DDIMScheduler

    s = config.schedule
    return DDIMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        beta_schedule=s.beta_schedule,
        prediction_type=s.prediction_type,
        timestep_spacing=s.timestep_spacing,
        steps_offset=s.steps_offset,
        set_alpha_to_one=s.set_alpha_to_one,
        clip_sample=False,
    )


@pytest.fixture(scope="session")
def diffusers_pipeline(tiny_model):
    """``diffusers_pipeline(cls_name, kind)`` -> a diffusers pipeline over ``tiny_model(kind)``."""

    def make(name: str, kind: str) -> Any:
        import diffusers

        model = tiny_model(kind)
        parts = {
            "vae": model.vae,
            "text_encoder": model.text_encoder,
            "tokenizer": model.tokenizer,
            "unet": model.unet,
            "scheduler": ddim_scheduler(model.ours.config),
        }
        if name == "StableDiffusionUpscalePipeline":
            from diffusers import DDPMScheduler

            from latentdiffusion.pipelines.upscale import LOW_RES_SCHEDULE, MAX_NOISE_LEVEL

            low = LOW_RES_SCHEDULE
            parts["low_res_scheduler"] = DDPMScheduler(
                beta_start=low.beta_start, beta_end=low.beta_end, beta_schedule=low.beta_schedule
            )
            parts["max_noise_level"] = MAX_NOISE_LEVEL
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = getattr(diffusers, name)(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture
def eval_shapes_settings(monkeypatch):
    """``run(*args)``: ``ldm eval-shapes --n 1 *args`` on a stand-in model, stopped at its first
    ``evaluate`` call; returns the generation settings that call was given."""
    import types

    import latentdiffusion
    from latentdiffusion.cli.main import main
    from latentdiffusion.errors import UserError
    from latentdiffusion.evaluation import shapes_eval

    def run(*args: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def stop(pipe, prompts, **settings):
            seen.update(settings)
            raise UserError("stop here")

        monkeypatch.setattr(
            latentdiffusion, "load", lambda source, **options: types.SimpleNamespace(config=TINY)
        )
        monkeypatch.setattr(shapes_eval, "evaluate", stop)
        assert main(["eval-shapes", "--n", "1", *args]) == 2
        return seen

    return run
