"""Stable Diffusion 3 and 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis"): SD3 Medium, SD3.5 Large (and Large Turbo) and SD3.5 Medium.

The denoising network is an MMDiT (``models.mmdit``; diffusers' role name "transformer") trained with
rectified flow (``diffusion.process``: velocity prediction, time shift 3.0). Three text encoders: OpenAI
CLIP ViT-L and OpenCLIP ViT-bigG, read at their penultimate layer as in SDXL, and the T5-XXL v1.1
encoder (``models.t5``). The context is [CLIP-L states | bigG states] on the feature axis (768 + 1280),
zero-padded to T5's width (4096), followed on the sequence axis by T5's states (256 tokens); the pooled
vector ``y`` is [CLIP-L pooled | bigG pooled] (768 + 1280), both projected (Sec. 4 and App. B.1).
Without T5 (a file that has none, or a model loaded without it to save memory) its states are zeros,
as the reference pipeline allows. The autoencoder has 16 latent channels, no 1x1 convolutions around the
latent, scale 1.5305 and shift 0.0609; image sides are multiples of 16 (8x down, 2x2 patches).

Prompts: the CLIP encoders take the web UI's syntax as for SD 1.x/XL (weights, BREAK, 75-token chunks;
the pooled vectors from the first chunk); T5 takes the prompt's text with the syntax removed, truncated
to 256 tokens. An empty negative prompt is the encoding of "" (SD3's pipeline does not zero it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.config import ModelConfig, T5Config, TextEncoderConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import Cond, ConditioningRequest, Family, LatentFormat, module_device
from latentdiffusion.models.autoencoder import build_autoencoder
from latentdiffusion.models.text_encoder import TextEncoder

if TYPE_CHECKING:
    from latentdiffusion.components import Components

CLIP_ROLES = ("text_encoder", "text_encoder_2")
T5_ROLE = "text_encoder_3"
DIFFUSERS_PIPELINES = (
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
)


class StableDiffusion3(Family):
    """SD3 / SD3.5: MMDiT ("transformer"), CLIP-L, bigG and (optionally) T5-XXL."""

    name = "sd3"
    description = "Stable Diffusion 3"
    network_role = "transformer"
    text_roles = (*CLIP_ROLES, T5_ROLE)
    pooled_roles = CLIP_ROLES

    def model_roles(self, config: ModelConfig) -> tuple[str, ...]:
        return tuple(role for role in self.roles if role != T5_ROLE or config.text_encoder_3 is not None)

    def build(self, config: ModelConfig) -> dict[str, torch.nn.Module]:
        from latentdiffusion.models.mmdit import MMDiT
        from latentdiffusion.models.t5 import T5Encoder

        self.check_config(config)
        modules: dict[str, torch.nn.Module] = {
            "transformer": MMDiT(config.transformer),
            "autoencoder": build_autoencoder(config.autoencoder),
        }
        for role, text in self.clip_configs(config).items():
            modules[role] = TextEncoder(text)
        if config.text_encoder_3 is not None:
            modules[T5_ROLE] = T5Encoder(config.text_encoder_3)
        return modules

    def clip_configs(self, config: ModelConfig) -> dict[str, TextEncoderConfig]:
        return {"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2}

    def text_configs(self, config: ModelConfig) -> dict[str, TextEncoderConfig]:
        return self.clip_configs(config)

    def tokenizers(self, config: ModelConfig) -> dict[str, Any]:
        from latentdiffusion.models.t5 import T5Tokenizer

        tokenizers: dict[str, Any] = super().tokenizers(config)
        if config.text_encoder_3 is not None:
            tokenizers[T5_ROLE] = T5Tokenizer.from_bundled()
        return tokenizers

    def latent_format(self, config: ModelConfig) -> LatentFormat:
        vae, network = config.autoencoder, config.transformer
        return LatentFormat(
            network.out_channels,
            vae.downsampling_factor,
            vae.scaling_factor,
            vae.shift_factor,
            network.patch_size,
        )

    def check_config(self, config: ModelConfig) -> None:
        network = config.transformer
        if network is None:
            raise UserError(f"model {config.name!r}: an {self.description} model needs a transformer config")
        clips = self.clip_configs(config)
        if any(text is None for text in clips.values()):
            raise UserError(f"model {config.name!r}: an {self.description} model needs CLIP-L and bigG")
        if config.autoencoder.latent_channels != network.in_channels:
            raise UserError(
                f"model {config.name!r}: the autoencoder has {config.autoencoder.latent_channels} latent "
                f"channels and the transformer takes {network.in_channels}"
            )
        clip_width = sum(text.hidden_size for text in clips.values())
        if clip_width > network.context_dim:
            raise UserError(
                f"model {config.name!r}: the CLIP states ({clip_width} wide) are wider than the "
                f"transformer's context ({network.context_dim})"
            )
        pooled = sum(text.projection_dim or text.hidden_size for text in clips.values())
        if pooled != network.pooled_dim:
            raise UserError(
                f"model {config.name!r}: the pooled CLIP outputs are {pooled} wide, the transformer "
                f"takes {network.pooled_dim}"
            )
        t5 = config.text_encoder_3
        if t5 is not None and t5.hidden_size != network.context_dim:
            raise UserError(
                f"model {config.name!r}: T5's states are {t5.hidden_size} wide, the transformer's context "
                f"{network.context_dim}"
            )

    # ---- conditioning

    def encode(
        self,
        components: Components,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        request: ConditioningRequest,
    ) -> tuple[Cond, Cond]:
        from latentdiffusion.prompts import count_chunks

        first = components.tokenizers[CLIP_ROLES[0]]
        chunks = max(count_chunks(first, prompts), count_chunks(first, negative_prompts))
        cond = self.encode_side(components, prompts, chunks)
        uncond = self.encode_side(components, negative_prompts, chunks)
        return cond, uncond

    def encode_side(self, components: Components, prompts: Sequence[str], chunks: int) -> Cond:
        """{"context": [N, chunks * 77 + T5 length, context_dim], "y": [N, pooled_dim]} for one side."""
        from latentdiffusion.prompts import encode_prompts

        states, pooled = [], []
        for role in CLIP_ROLES:
            tokenizer, encoder = components.tokenizers[role], components.modules[role]
            context, vector = encode_prompts(tokenizer, encoder, prompts, chunks, pooled=True)
            states.append(context)
            pooled.append(vector)
        context = joint_context(torch.cat(states, dim=-1), self.t5_states(components, prompts))
        dtype = components.dtype
        return {"context": context.to(dtype), "y": torch.cat(pooled, dim=-1).to(dtype)}

    def t5_states(self, components: Components, prompts: Sequence[str]) -> torch.Tensor:
        """T5's states [N, length, width] of the prompts' plain text, or zeros without T5."""
        from latentdiffusion.prompts import plain_text

        config = components.config
        encoder = components.modules.get(T5_ROLE)
        if encoder is None:
            length = (config.text_encoder_3 or T5Config()).max_length
            return torch.zeros(len(prompts), length, config.transformer.context_dim, device=components.device)
        tokenizer = components.tokenizers[T5_ROLE]
        ids = tokenizer([plain_text(prompt) for prompt in prompts], config.text_encoder_3.max_length)
        return encoder(ids.to(module_device(encoder))).float()

    def training_condition(
        self, components: Components, captions: Sequence[str], requests: Sequence[ConditioningRequest]
    ) -> Cond:
        """The joint context and pooled vector of the plainly tokenized captions (no weighting syntax)."""
        states, pooled = [], []
        for role in CLIP_ROLES:
            encoder = components.modules[role]
            ids = components.tokenizers[role](list(captions)).to(module_device(encoder))
            context, vector = encoder(ids, pooled=True)
            states.append(context)
            pooled.append(vector)
        t5 = self.t5_states(components, captions)
        return {"context": joint_context(torch.cat(states, dim=-1), t5), "y": torch.cat(pooled, dim=-1)}


def joint_context(clip: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """[CLIP states zero-padded to T5's width ; T5 states] on the sequence axis (SD3's context)."""
    padded = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([padded, t5.to(padded.dtype)], dim=-2)


SD3 = StableDiffusion3()
