"""Stable Diffusion 1.x and 2.x (Rombach et al. 2022), with their inpainting and x4-upscaler variants, and
every model of the same shape (the shipped shapes model, the latent-vs-pixel study's models).

One U-Net, one KL autoencoder, one CLIP-architecture text encoder whose hidden states are the U-Net's
cross-attention context; discrete variance-preserving noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.checkpoints.lora_keys import SD_PREFIXES
from latentdiffusion.config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.families.base import Cond, ConditioningRequest, Family, module_device
from latentdiffusion.models.autoencoder import build_autoencoder
from latentdiffusion.models.text_encoder import TextEncoder
from latentdiffusion.models.unet import UNet

if TYPE_CHECKING:
    from latentdiffusion.components import Components


DIFFUSERS_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInpaintPipelineLegacy",
    "StableDiffusionUpscalePipeline",
)
UPSCALER_MAX_NOISE_LEVEL = 350  # the x4 upscaler pipeline's max_noise_level


class StableDiffusion(Family):
    name = "sd"
    description = "Stable Diffusion 1.x/2.x"
    text_roles = ("text_encoder",)
    lora_prefixes = SD_PREFIXES

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

    def training_condition(
        self, components: Components, captions: Sequence[str], requests: Sequence[ConditioningRequest]
    ) -> Cond:
        """The text encoder's states of the plainly tokenized captions; an empty caption is the encoding of
        "", as the empty negative prompt is at inference."""
        encoder = components.modules["text_encoder"]
        ids = components.tokenizers["text_encoder"](list(captions)).to(module_device(encoder))
        return {"context": encoder(ids)}

    def reads_diffusers(self, index: Mapping[str, Any]) -> bool:
        return index.get("_class_name") in DIFFUSERS_PIPELINES

    def diffusers_base(self, unet: UNetConfig | None) -> ModelConfig:
        upscaler = unet is not None and unet.num_class_embeds is not None
        return PRESETS["sd-x4-upscaler"] if upscaler else ModelConfig(name="sd")

    def diffusers_index(self, config: ModelConfig) -> dict[str, Any]:
        index: dict[str, Any] = {"feature_extractor": [None, None], "safety_checker": [None, None]}
        if config.unet.num_class_embeds is not None:
            index.update(
                _class_name="StableDiffusionUpscalePipeline",
                low_res_scheduler=["diffusers", "DDPMScheduler"],
                max_noise_level=UPSCALER_MAX_NOISE_LEVEL,
                watermarker=[None, None],
            )
            return index
        inpaint = config.unet.in_channels == 9
        index["_class_name"] = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
        index.update(image_encoder=[None, None], requires_safety_checker=False)
        return index


SD = StableDiffusion()
