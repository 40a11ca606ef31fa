"""SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis"): the base model and the refiner.

Base: a U-Net with deeper transformers at lower resolutions and none at full resolution (Sec. 2.1), two
text encoders, OpenAI CLIP ViT-L and OpenCLIP ViT-bigG, whose penultimate hidden states are concatenated
on the feature axis into a 2048-wide cross-attention context, and a vector condition ``y`` = bigG's
projected pooled output followed by the sinusoidal embeddings (256 wide each) of the size and crop
conditioning: original size (h, w), crop top-left (top, left), target size (h, w) (Sec. 2.2). Refiner:
bigG alone and (original size, crop, aesthetic score) in ``y`` (Sec. 2.5). Both use discrete VP noise as
SD 1/2, and an autoencoder of the same shape with latent scale 0.13025.

Prompts follow the web UI's rules across both encoders (weights, BREAK and 75-token chunks for each;
the pooled vector from the first chunk). An empty negative prompt is a zero condition when the model
says so (``ModelConfig.zero_empty_negative``, the reference pipeline's ``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.checkpoints.lora_keys import SDXL_PREFIXES, SDXL_REFINER_PREFIXES
from latentdiffusion.config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import Cond, ConditioningRequest, Family, module_device
from latentdiffusion.models.autoencoder import build_autoencoder
from latentdiffusion.models.text_encoder import TextEncoder
from latentdiffusion.models.unet import UNet, vector_conditioning

if TYPE_CHECKING:
    from latentdiffusion.checkpoints.layout import Layout
    from latentdiffusion.components import Components

SCALING_FACTOR = 0.13025  # the SDXL autoencoder's latent scale
DIFFUSERS_PIPELINES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


class StableDiffusionXL(Family):
    """SDXL base: CLIP-L ("text_encoder") and bigG ("text_encoder_2"); y = pooled + 6 size numbers."""

    name = "sdxl"
    description = "SDXL"
    text_roles = ("text_encoder", "text_encoder_2")
    lora_prefixes = SDXL_PREFIXES
    micro_fields = (
        "original_size",
        "crops_coords_top_left",
        "target_size",
        "negative_original_size",
        "negative_crops_coords_top_left",
        "negative_target_size",
    )
    pooled_roles = ("text_encoder_2",)
    micro_numbers = 6  # original size (2), crop top-left (2), target size (2)

    def build(self, config: ModelConfig) -> dict[str, torch.nn.Module]:
        self.check_config(config)
        modules = {"unet": UNet(config.unet), "autoencoder": build_autoencoder(config.autoencoder)}
        for role, text in self.text_configs(config).items():
            modules[role] = TextEncoder(text)
        return modules

    def text_configs(self, config: ModelConfig) -> dict[str, TextEncoderConfig]:
        return {"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2}

    def check_config(self, config: ModelConfig) -> None:
        texts = self.text_configs(config)
        if any(text is None for text in texts.values()):
            raise UserError(f"model {config.name!r}: an {self.description} model needs {' and '.join(texts)}")
        context = sum(text.hidden_size for text in texts.values())
        if config.unet.context_dim != context:
            raise UserError(
                f"model {config.name!r}: U-Net context_dim {config.unet.context_dim} is not the text "
                f"encoders' combined width {context}"
            )
        self.micro_width(config)

    def micro_width(self, config: ModelConfig) -> int:
        """The width of each micro-conditioning number's sinusoidal embedding (256 in SDXL)."""
        pooled = pooled_width(config.text_encoder_2)
        numbers = (config.unet.adm_in_channels or 0) - pooled
        if numbers <= 0 or numbers % self.micro_numbers or (numbers // self.micro_numbers) % 2:
            raise UserError(
                f"model {config.name!r}: U-Net adm_in_channels {config.unet.adm_in_channels} is not the "
                f"pooled width {pooled} plus {self.micro_numbers} even-width embeddings"
            )
        return numbers // self.micro_numbers

    def encode(
        self,
        components: Components,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        request: ConditioningRequest,
    ) -> tuple[Cond, Cond]:
        from latentdiffusion.prompts import count_chunks

        request.micro.validate()
        first = components.tokenizers[self.text_roles[0]]
        chunks = max(count_chunks(first, prompts), count_chunks(first, negative_prompts))
        context, pooled = self.encode_text(components, prompts, chunks)
        if list(negative_prompts) == list(prompts):  # the same text, the same states: encoded once
            uncond_context, uncond_pooled = context, pooled
        else:
            uncond_context, uncond_pooled = self.encode_text(components, negative_prompts, chunks)
        uncond_context, uncond_pooled = self.zero_empty(
            components.config, uncond_context, uncond_pooled, negative_prompts
        )
        width, dtype = self.micro_width(components.config), components.dtype
        y = vector_conditioning(pooled, self.time_ids(request, len(prompts), negative=False), width)
        uncond_y = vector_conditioning(
            uncond_pooled, self.time_ids(request, len(prompts), negative=True), width
        )
        return {"context": context.to(dtype), "y": y}, {"context": uncond_context.to(dtype), "y": uncond_y}

    def zero_empty(
        self, config: ModelConfig, context: torch.Tensor, pooled: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context and pooled vector zeroed for the empty ``texts`` when the model says so
        (``zero_empty_negative``): sgm trained its unconditional side as zeros (its conditioner's
        dropout zeroes the embeddings), so the reference pipeline conditions an empty prompt that way."""
        if not config.zero_empty_negative:
            return context, pooled
        empty = torch.tensor([not text for text in texts], device=context.device)
        return context.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)

    def training_condition(
        self, components: Components, captions: Sequence[str], requests: Sequence[ConditioningRequest]
    ) -> Cond:
        """Both encoders' penultimate states of the plainly tokenized captions, concatenated, and y =
        bigG's pooled output + the sinusoids of each item's size and crop (Podell et al. 2023, Sec. 2.2);
        a dropped (empty) caption is zeros, as sgm's conditioner drops it."""
        states, pooled = [], None
        for role in self.text_roles:
            encoder = components.modules[role]
            ids = components.tokenizers[role](list(captions)).to(module_device(encoder))
            if role in self.pooled_roles:
                context, pooled = encoder(ids, pooled=True)
            else:  # the context alone: the last layer, which nothing reads, does not run
                context = encoder(ids)
            states.append(context)
        config = components.config
        context, pooled = self.zero_empty(config, torch.cat(states, dim=-1), pooled, captions)
        numbers = [self.micro_numbers_of(request, negative=False) for request in requests]
        time_ids = torch.tensor(numbers, dtype=torch.float32)
        return {"context": context, "y": vector_conditioning(pooled, time_ids, self.micro_width(config))}

    def time_ids(self, request: ConditioningRequest, batch: int, *, negative: bool) -> torch.Tensor:
        """The micro-conditioning numbers [batch, micro_numbers] of one side of guidance."""
        numbers = self.micro_numbers_of(request, negative=negative)
        return torch.tensor([numbers], dtype=torch.float32).expand(batch, -1)

    def encode_text(
        self, components: Components, prompts: Sequence[str], chunks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [N, chunks * 77, sum of widths], pooled [N, P] of the last encoder), float32."""
        from latentdiffusion.prompts import encode_prompts

        states, pooled = [], None
        for role in self.text_roles:
            tokenizer, encoder = components.tokenizers[role], components.modules[role]
            context, pooled = encode_prompts(tokenizer, encoder, prompts, chunks, pooled=True)
            states.append(context)
        return torch.cat(states, dim=-1), pooled

    def single_file_config(
        self, shapes: Mapping[str, tuple[int, ...]], source: str, name: str
    ) -> ModelConfig | None:
        from latentdiffusion.checkpoints import detect, original_keys

        bigg_prefix = self.bigg_prefix()
        if f"{bigg_prefix}token_embedding.weight" not in shapes or self.extra_text_encoder(shapes):
            return None
        texts = {"text_encoder_2": detect.sgm_openclip_text(shapes, bigg_prefix, source)}
        if "text_encoder" in self.text_roles:
            texts["text_encoder"] = detect.sgm_clip_text(shapes, original_keys.SDXL_CLIP_L_PREFIX, source)
        autoencoder = replace(detect.detect_autoencoder(shapes, source), scaling_factor=SCALING_FACTOR)
        base = PRESETS[self.name]
        return replace(
            base, name=name, unet=detect.detect_unet(shapes, source), autoencoder=autoencoder, **texts
        )

    def bigg_prefix(self) -> str:
        from latentdiffusion.checkpoints.original_keys import SDXL_BIGG_PREFIX

        return SDXL_BIGG_PREFIX

    def extra_text_encoder(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether the file holds a text encoder this family does not have (tells base from refiner)."""
        return False

    def single_file_layouts(self, config: ModelConfig) -> dict[str, Layout]:
        from latentdiffusion.checkpoints.original_keys import (
            autoencoder_layout,
            sdxl_text_layouts,
            unet_layout,
        )

        text_encoder = config.text_encoder if "text_encoder" in self.text_roles else None
        return {
            "unet": unet_layout(config.unet),
            "autoencoder": autoencoder_layout(config.autoencoder),
            **sdxl_text_layouts(text_encoder, config.text_encoder_2),
        }

    def reads_diffusers(self, index: Mapping[str, Any]) -> bool:
        has_clip_l = index.get("text_encoder", [None])[0] is not None
        return index.get("_class_name") in DIFFUSERS_PIPELINES and has_clip_l == (
            "text_encoder" in self.text_roles
        )

    def diffusers_base(self, unet: UNetConfig | None) -> ModelConfig:
        return PRESETS[self.name]

    def adapt_text_config(self, text: TextEncoderConfig) -> TextEncoderConfig:
        return replace(text, context_from_penultimate=True)  # the SDXL pipelines read hidden_states[-2]

    def diffusers_index(self, config: ModelConfig) -> dict[str, Any]:
        inpaint = config.unet.in_channels > config.unet.out_channels
        index: dict[str, Any] = {
            "_class_name": DIFFUSERS_PIPELINES[2 if inpaint else 0],
            "force_zeros_for_empty_prompt": config.zero_empty_negative,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
        }
        if "text_encoder" not in self.text_roles:
            index["text_encoder"], index["tokenizer"] = [None, None], [None, None]
        return index

    def micro_numbers_of(self, request: ConditioningRequest, *, negative: bool) -> list[float]:
        """original size (h, w), crop (top, left), target size (h, w), in the reference pipeline's order."""
        original, crop, target = sizes(request, negative)
        return [*original, *crop, *target]


class StableDiffusionXLRefiner(StableDiffusionXL):
    """The SDXL refiner: bigG alone ("text_encoder_2"); y = pooled + original size, crop, aesthetic score."""

    name = "sdxl-refiner"
    description = "SDXL refiner"
    text_roles = ("text_encoder_2",)
    lora_prefixes = SDXL_REFINER_PREFIXES
    micro_fields = (
        "original_size",
        "crops_coords_top_left",
        "negative_original_size",
        "negative_crops_coords_top_left",
        "aesthetic_score",
        "negative_aesthetic_score",
    )
    # trained on the low noise levels only (Podell et al. 2023, Sec. 2.5)
    text_to_image_refusal = "the SDXL refiner refines images: use img2img or --refiner"
    micro_numbers = 5  # original size (2), crop top-left (2), aesthetic score (1)

    def text_configs(self, config: ModelConfig) -> dict[str, TextEncoderConfig]:
        return {"text_encoder_2": config.text_encoder_2}

    def check_training(self, config: ModelConfig) -> None:
        raise UserError(
            "training the SDXL refiner is not supported yet: it learns the low noise levels only and "
            "conditions on aesthetic scores (Podell et al. 2023, Sec. 2.5); fine-tune the SDXL base model"
        )

    def bigg_prefix(self) -> str:
        from latentdiffusion.checkpoints.original_keys import SDXL_REFINER_BIGG_PREFIX

        return SDXL_REFINER_BIGG_PREFIX

    def extra_text_encoder(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        from latentdiffusion.checkpoints.original_keys import SDXL_BIGG_PREFIX

        return any(key.startswith(SDXL_BIGG_PREFIX) for key in shapes)

    def diffusers_index(self, config: ModelConfig) -> dict[str, Any]:
        index = super().diffusers_index(config)
        index.update(_class_name=DIFFUSERS_PIPELINES[1], requires_aesthetics_score=True)
        return index

    def micro_numbers_of(self, request: ConditioningRequest, *, negative: bool) -> list[float]:
        original, crop, _ = sizes(request, negative)
        micro = request.micro
        score = micro.negative_aesthetic_score if negative else micro.aesthetic_score
        return [*original, *crop, score]


def sizes(request: ConditioningRequest, negative: bool) -> tuple[tuple[int, int], ...]:
    """(original size, crop top-left, target size) of one side of guidance, defaults filled in."""
    values = request.micro.effective((request.height, request.width))
    side = "negative_" if negative else ""
    return tuple(
        values[f"{side}{name}"] for name in ("original_size", "crops_coords_top_left", "target_size")
    )


def pooled_width(text: TextEncoderConfig | None) -> int:
    if text is None:
        return 0
    return text.projection_dim or text.hidden_size


SDXL = StableDiffusionXL()
SDXL_REFINER = StableDiffusionXLRefiner()
