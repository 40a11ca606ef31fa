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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.checkpoints.lora_keys import SD3_PREFIXES
from latentdiffusion.checkpoints.network_lora import MMDIT_LORA
from latentdiffusion.config import PRESETS, MMDiTConfig, ModelConfig, T5Config, TextEncoderConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import Cond, ConditioningRequest, Family, LatentFormat, module_device
from latentdiffusion.models.autoencoder import build_autoencoder
from latentdiffusion.models.text_encoder import TextEncoder

if TYPE_CHECKING:
    from latentdiffusion.checkpoints.layout import Layout
    from latentdiffusion.components import Components

CLIP_ROLES = ("text_encoder", "text_encoder_2")
T5_ROLE = "text_encoder_3"
# where a single file keeps each text encoder (transformers' names under these prefixes)
SINGLE_FILE_TEXT_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    T5_ROLE: "text_encoders.t5xxl.transformer.",
}
# which released model a file is, by its transformer's depth and positional grid (for the defaults)
PRESET_BY_SHAPE = {(24, 192): "sd3-medium", (38, 192): "sd35-large", (24, 384): "sd35-medium"}
# LoRA files for T5 (sd-scripts' lora_te3_, diffusers' text_encoder_3.) are refused: not supported yet
T5_LORA_REFUSAL = {("lora_te3_", "text_encoder_3."): "the T5 text encoder (text_encoder_3)"}
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
    # LoRA files: the MMDiT's names (``checkpoints.mmdit_lora_keys``), the CLIP encoders' as SDXL's
    network_lora = MMDIT_LORA
    lora_prefixes = SD3_PREFIXES
    lora_refusals = T5_LORA_REFUSAL

    optional_roles = (T5_ROLE,)

    def without_roles(self, config: ModelConfig, roles: Collection[str], source: str) -> ModelConfig:
        super().without_roles(config, roles, source)
        return replace(config, text_encoder_3=None) if T5_ROLE in roles else config

    def network_config(self, config: ModelConfig) -> MMDiTConfig:
        return config.transformer

    def skip_layer_blocks(self, config: ModelConfig) -> int:
        return config.transformer.depth

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
        return replace(super().latent_format(config), patch=config.transformer.patch_size)

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
        if list(negative_prompts) == list(prompts):  # the same text, the same states: encoded once
            return cond, dict(cond)
        return cond, self.encode_side(components, negative_prompts, chunks)

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
        texts = [plain_text(prompt) for prompt in prompts]
        ids = tokenizer.encode(texts, config.text_encoder_3.max_length)
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

    def idle_text_modules(self, components: Components) -> dict[str, tuple[str, ...]]:
        """None: both CLIP encoders give their pooled outputs (every layer runs), T5 its last states."""
        return {}

    # ---- single files: model.diffusion_model.* (MMDiT), first_stage_model.*, text_encoders.*

    def single_file_config(
        self, shapes: Mapping[str, tuple[int, ...]], source: str, name: str
    ) -> ModelConfig | None:
        from latentdiffusion.checkpoints import detect
        from latentdiffusion.checkpoints.keymap import strip_prefix
        from latentdiffusion.checkpoints.mmdit_keys import MMDIT_PREFIX, mmdit_config_from_shapes
        from latentdiffusion.checkpoints.t5_keys import t5_config_from_state_dict

        if f"{MMDIT_PREFIX}joint_blocks.0.x_block.attn.qkv.weight" not in shapes:
            return None
        transformer = mmdit_config_from_shapes(strip_prefix(shapes, MMDIT_PREFIX))
        base = self.diffusers_base(transformer)
        transformer = replace(transformer, sample_size=base.transformer.sample_size)
        texts = {}
        for role in CLIP_ROLES:
            prefix = SINGLE_FILE_TEXT_PREFIXES[role]
            if f"{prefix}text_model.embeddings.token_embedding.weight" not in shapes:
                raise UserError(
                    f"{source}: an SD3 file without its text encoders is not supported ({prefix}*)"
                )
            detected = detect.sgm_clip_text(shapes, prefix, source)
            projection = shapes.get(f"{prefix}text_projection.weight")
            texts[role] = self.clip_config(
                detected, getattr(base, role), projection[0] if projection else None
            )
        t5_prefix = SINGLE_FILE_TEXT_PREFIXES[T5_ROLE]
        t5 = None
        if any(key.startswith(t5_prefix) for key in shapes):
            t5 = t5_config_from_state_dict(shapes, t5_prefix, source)
            t5 = replace(t5, max_length=base.text_encoder_3.max_length)
        autoencoder = detect.detect_autoencoder(shapes, source)
        autoencoder = replace(
            autoencoder,
            scaling_factor=base.autoencoder.scaling_factor,
            shift_factor=base.autoencoder.shift_factor,
        )
        return replace(
            base, name=name, transformer=transformer, autoencoder=autoencoder, text_encoder_3=t5, **texts
        )

    def clip_config(
        self, detected: TextEncoderConfig, released: TextEncoderConfig, projection: int | None
    ) -> TextEncoderConfig:
        """A CLIP text config read from shapes, with what shapes cannot tell (the activation, the padding
        token) from the released encoder in the same place (CLIP-L: quick GELU, padded with end-of-text;
        bigG: GELU, padded with "!")."""
        return replace(
            detected,
            activation=released.activation,
            pad_token_id=released.pad_token_id,
            projection_dim=projection,
            context_from_penultimate=True,
        )

    def single_file_layouts(self, config: ModelConfig) -> dict[str, Layout]:
        from latentdiffusion.checkpoints.mmdit_keys import mmdit_layout
        from latentdiffusion.checkpoints.original_keys import autoencoder_layout, hf_text_layout
        from latentdiffusion.checkpoints.t5_keys import t5_layout

        layouts = {
            "transformer": mmdit_layout(),
            "autoencoder": autoencoder_layout(config.autoencoder),
        }
        for role, text in self.clip_configs(config).items():
            layouts[role] = hf_text_layout(text, SINGLE_FILE_TEXT_PREFIXES[role])
        if config.text_encoder_3 is not None:
            layouts[T5_ROLE] = t5_layout(SINGLE_FILE_TEXT_PREFIXES[T5_ROLE])
        return layouts

    # ---- diffusers folders: transformer/, vae/, text_encoder*/ and tokenizer*/ (``_3``: T5), scheduler/

    def reads_diffusers(self, index: Mapping[str, Any]) -> bool:
        return index.get("_class_name") in DIFFUSERS_PIPELINES

    def diffusers_base(self, network: Any) -> ModelConfig:
        if not isinstance(network, MMDiTConfig):
            return PRESETS["sd3-medium"]
        return PRESETS[PRESET_BY_SHAPE.get((network.depth, network.pos_embed_max_size), "sd3-medium")]

    def adapt_text_config(self, text: Any) -> Any:
        if isinstance(text, TextEncoderConfig):  # the pipeline reads hidden_states[-2]
            return replace(text, context_from_penultimate=True)
        return text

    def diffusers_index(self, config: ModelConfig) -> dict[str, Any]:
        return {
            "_class_name": DIFFUSERS_PIPELINES[0],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }


def joint_context(clip: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """[CLIP states zero-padded to T5's width ; T5 states] on the sequence axis (SD3's context)."""
    padded = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([padded, t5.to(padded.dtype)], dim=-2)


SD3 = StableDiffusion3()
