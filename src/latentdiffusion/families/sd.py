"""Stable Diffusion 1.x and 2.x (Rombach et al. 2022), with their inpainting and x4-upscaler variants, and
every model of the same shape (the shipped shapes model, the latent-vs-pixel study's models).

One U-Net, one KL autoencoder, one CLIP-architecture text encoder whose hidden states are the U-Net's
cross-attention context; discrete variance-preserving noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from latentdiffusion.config import ModelConfig, TextEncoderConfig
from latentdiffusion.families.base import Cond, ConditioningRequest, Family
from latentdiffusion.models.autoencoder import build_autoencoder
from latentdiffusion.models.text_encoder import TextEncoder
from latentdiffusion.models.unet import UNet

if TYPE_CHECKING:
    from latentdiffusion.components import Components


class StableDiffusion(Family):
    name = "sd"
    description = "Stable Diffusion 1.x/2.x"
    text_roles = ("text_encoder",)

    def build(self, config: ModelConfig) -> dict[str, torch.nn.Module]:
        return {
            "unet": UNet(config.unet),
            "autoencoder": build_autoencoder(config.autoencoder),
            "text_encoder": TextEncoder(config.text_encoder),
        }

    def text_configs(self, config: ModelConfig) -> dict[str, TextEncoderConfig]:
        return {"text_encoder": config.text_encoder}

    def encode(
        self,
        components: Components,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        request: ConditioningRequest,
    ) -> tuple[Cond, Cond]:
        from latentdiffusion.prompts import encode_prompt_pair

        context, uncond = encode_prompt_pair(components, prompts, negative_prompts)
        return {"context": context}, {"context": uncond}


SD = StableDiffusion()
