"""Key tables for the original (CompVis / Stability AI) single-file layout, generated from our configs.

The released ``.ckpt`` / ``.safetensors`` files hold one ``LatentDiffusion`` module:
``model.diffusion_model.`` (the U-Net, ``openaimodel.UNetModel``: flat ``input_blocks.N.M`` /
``middle_block.M`` / ``output_blocks.N.M`` lists), ``first_stage_model.`` (the KL autoencoder,
``encoder.down.I.block.J`` with the decoder's ``up.I`` indexed by resolution, mid attention as 1x1
convs) and ``cond_stage_model.`` (SD 1: transformers CLIP under ``transformer.``; SD 2: OpenCLIP under
``model.``). Stability's ``sgm`` files (SDXL) keep the U-Net and autoencoder names and hold their text
encoders in a ``conditioner.embedders.N.`` list instead (``sdxl_text_layouts``). The flat indices follow
from the U-Net's shape by index arithmetic, so the tables are computed here from ``UNetConfig`` /
``AutoencoderConfig`` rather than written out.
"""

from __future__ import annotations

from collections.abc import Iterable

from latentdiffusion.checkpoints.keymap import KeyTable
from latentdiffusion.checkpoints.layout import Layout
from latentdiffusion.checkpoints.text_encoder_keys import HF_CLIP_TEXT, openclip_layout
from latentdiffusion.config import AutoencoderConfig, ControlNetConfig, TextEncoderConfig, UNetConfig

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."
# sgm's GeneralConditioner: SDXL base holds CLIP ViT-L (transformers names) then OpenCLIP ViT-bigG; the
# refiner holds bigG alone
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."

# Inside a ResBlock (ours, theirs): openaimodel keeps its layers in nn.Sequentials.
UNET_RESBLOCK: KeyTable = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
# Inside a SpatialTransformer; its norm / proj_in / proj_out keep their names.
UNET_TRANSFORMER: KeyTable = (
    ("blocks.{}.attn{}.to_out", "transformer_blocks.{}.attn{}.to_out.0"),
    ("blocks.{}.ff.proj_in", "transformer_blocks.{}.ff.net.0.proj"),
    ("blocks.{}.ff.proj_out", "transformer_blocks.{}.ff.net.2"),
    ("blocks.{}", "transformer_blocks.{}"),
)
AUTOENCODER_RESBLOCK: KeyTable = (("conv_shortcut", "nin_shortcut"),)
AUTOENCODER_ATTENTION: KeyTable = (
    ("attn.to_q", "q"),
    ("attn.to_k", "k"),
    ("attn.to_v", "v"),
    ("attn.to_out", "proj_out"),
)
UNET_TOP: KeyTable = (
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    # SDXL's vector-conditioning MLP, nn.Sequential(nn.Sequential(Linear, SiLU, Linear)); before the
    # x4 upscaler's entry, whose "label_emb" prefix would otherwise claim "label_emb.0.0" on reading
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("class_embedding", "label_emb"),  # the x4 upscaler's noise-level embedding (nn.Embedding)
    ("norm_out", "out.0"),
    ("conv_out", "out.2"),
)
# Training-time entries of a LatentDiffusion checkpoint that carry no weights of the three networks.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)
UNUSED_TOP_LEVEL = (
    *SCHEDULE_BUFFERS,
    "model_ema",
    "low_scale_model",
    "first_stage_model.loss",
    "v_pred",
    "ztsnr",
    "denoiser",  # sgm's denoiser buffers (sigmas of the discrete schedule)
    "edm_vpred",  # sgm's v-prediction / EDM settings in some SDXL-derived files
    "model.model_sampling",  # the sampling buffers (sigmas) ComfyUI writes into SD3 files
    # CLIP's contrastive temperature beside each text encoder of an SD3 file
    *(f"text_encoders.{name}.logit_scale" for name in ("clip_l", "clip_g", "t5xxl")),
)


def nest(outer: Iterable[tuple[str, str]], inner: KeyTable) -> KeyTable:
    """Each (ours, theirs) location combined with each inner template, then the location itself."""
    table = []
    for ours, theirs in outer:
        table += [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in inner]
        table.append((ours, theirs))
    return tuple(table)


def unet_locations(config: UNetConfig) -> tuple[list[tuple[str, str]], ...]:
    """(resblocks, transformers, resamplers): our module paths and their flat openaimodel paths.

    input_blocks: 0 is conv_in, then per level num_res_blocks entries (ResBlock, transformer) and one
    downsample; output_blocks: per level (deepest first) num_res_blocks + 1 entries, the last of which
    also holds the upsample (after the transformer when the level has one).
    """
    n, levels = config.num_res_blocks, len(config.channel_mult)
    resblocks, transformers, resamplers = [], [], []
    for i in range(levels):
        for j in range(n):
            block = f"input_blocks.{1 + i * (n + 1) + j}"
            resblocks.append((f"down_blocks.{i}.resnets.{j}", f"{block}.0"))
            if i in config.attention_levels:
                transformers.append((f"down_blocks.{i}.attentions.{j}", f"{block}.1"))
        if i < levels - 1:
            resamplers.append((f"down_blocks.{i}.downsample.conv", f"input_blocks.{(i + 1) * (n + 1)}.0.op"))
    resblocks += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.resnets.1", "middle_block.2")]
    transformers.append(("mid_block.attention", "middle_block.1"))
    for u, level in enumerate(reversed(range(levels))):
        attention = level in config.attention_levels
        for j in range(n + 1):
            block = f"output_blocks.{u * (n + 1) + j}"
            resblocks.append((f"up_blocks.{u}.resnets.{j}", f"{block}.0"))
            if attention:
                transformers.append((f"up_blocks.{u}.attentions.{j}", f"{block}.1"))
        if level > 0:
            last = f"output_blocks.{u * (n + 1) + n}"
            resamplers.append((f"up_blocks.{u}.upsample.conv", f"{last}.{2 if attention else 1}.conv"))
    return resblocks, transformers, resamplers


def unet_layout(config: UNetConfig) -> Layout:
    resblocks, transformers, resamplers = unet_locations(config)
    table = nest(resblocks, UNET_RESBLOCK) + nest(transformers, UNET_TRANSFORMER) + tuple(resamplers)
    return Layout(UNET_PREFIX, table + UNET_TOP)


CONTROLNET_PREFIX = "control_model."


def controlnet_layout(config: ControlNetConfig, prefix: str = CONTROLNET_PREFIX) -> Layout:
    """An original ControlNet file (cldm's ``ControlNet``, under ``control_model.`` or without a prefix):
    the U-Net's encoder names, ``input_hint_block.N`` (convs at the even indices of an nn.Sequential with
    SiLUs between), ``zero_convs.N.0`` and ``middle_block_out.0``."""
    resblocks, transformers, resamplers = unet_locations(config.unet)
    encoder = ("down_blocks.", "mid_block.")
    resblocks = [pair for pair in resblocks if pair[0].startswith(encoder)]
    transformers = [pair for pair in transformers if pair[0].startswith(encoder)]
    resamplers = [pair for pair in resamplers if pair[0].startswith(encoder)]
    stages = 2 * (len(config.hint_channels) - 1)
    hint = [("hint_embedding.conv_in", "input_hint_block.0")]
    hint += [(f"hint_embedding.blocks.{k}", f"input_hint_block.{2 * k + 2}") for k in range(stages)]
    hint.append(("hint_embedding.conv_out", f"input_hint_block.{2 * stages + 2}"))
    control = (*hint, ("zero_convs.{}", "zero_convs.{}.0"), ("mid_zero_conv", "middle_block_out.0"))
    table = nest(resblocks, UNET_RESBLOCK) + nest(transformers, UNET_TRANSFORMER) + tuple(resamplers)
    return Layout(prefix, control + table + UNET_TOP)


def autoencoder_locations(config: AutoencoderConfig) -> tuple[list[tuple[str, str]], ...]:
    """(resblocks, attentions, resamplers) of the first stage; the decoder's ``up.I`` counts from
    full resolution, our ``up_blocks.U`` from the deepest level."""
    levels, n = len(config.block_channels), config.num_res_blocks
    resblocks, resamplers = [], []
    for i in range(levels):
        resblocks += [
            (f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}") for j in range(n)
        ]
        if i < levels - 1:
            resamplers.append((f"encoder.down_blocks.{i}.downsample", f"encoder.down.{i}.downsample"))
    for u, level in enumerate(reversed(range(levels))):
        resblocks += [
            (f"decoder.up_blocks.{u}.resnets.{j}", f"decoder.up.{level}.block.{j}") for j in range(n + 1)
        ]
        if level > 0:
            resamplers.append((f"decoder.up_blocks.{u}.upsample", f"decoder.up.{level}.upsample"))
    attentions = []
    for part in ("encoder", "decoder"):
        resblocks += [(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}") for j in range(2)]
        attentions.append((f"{part}.mid_block.attention", f"{part}.mid.attn_1"))
    return resblocks, attentions, resamplers


def autoencoder_layout(config: AutoencoderConfig) -> Layout:
    resblocks, attentions, resamplers = autoencoder_locations(config)
    table = (
        nest(resblocks, AUTOENCODER_RESBLOCK) + nest(attentions, AUTOENCODER_ATTENTION) + tuple(resamplers)
    )
    conv_weights = frozenset(
        f"{part}.mid_block.attention.attn.to_{name}.weight"
        for part in ("encoder", "decoder")
        for name in ("q", "k", "v", "out")
    )
    return Layout(AUTOENCODER_PREFIX, table, conv_weights=conv_weights)


# Files saved with transformers < 4.16 lack the ``text_model.`` level; read only (writes use the above).
LEGACY_HF_CLIP_TEXT: KeyTable = (
    ("embeddings.", "embeddings."),
    ("layers.{}.", "encoder.layers.{}."),
    ("final_layer_norm.", "final_layer_norm."),
)


def hf_text_layout(config: TextEncoderConfig, prefix: str = HF_TEXT_PREFIX) -> Layout:
    """SD 1.x: transformers' CLIPTextModel names under ``cond_stage_model.transformer.`` (SDXL's CLIP-L:
    under ``SDXL_CLIP_L_PREFIX``); a ``text_projection.weight`` keeps its name."""
    built = config.num_layers - config.skip_last_layers
    skipped = [
        f"{root}encoder.layers.{n}" for root in ("text_model.", "") for n in range(built, config.num_layers)
    ]
    unused = ("text_model.embeddings.position_ids", "embeddings.position_ids", *skipped)
    return Layout(prefix, HF_CLIP_TEXT + LEGACY_HF_CLIP_TEXT, ignored=unused)


def openclip_text_layout(config: TextEncoderConfig, prefix: str = OPENCLIP_TEXT_PREFIX) -> Layout:
    """SD 2.x: OpenCLIP names under ``cond_stage_model.model.`` (SDXL's bigG: under ``SDXL_BIGG_PREFIX``
    or ``SDXL_REFINER_BIGG_PREFIX``); the skipped last layer is dropped, and ``text_projection`` unless
    the config has a ``projection_dim``."""
    built = config.num_layers - config.skip_last_layers
    projection = config.projection_dim is not None
    return openclip_layout(built, config.num_layers, prefix=prefix, projection=projection)


def sdxl_text_layouts(
    text_encoder: TextEncoderConfig | None, text_encoder_2: TextEncoderConfig
) -> dict[str, Layout]:
    """The text encoders of an sgm (SDXL) single file, by diffusers' role names: base files hold CLIP-L
    (``text_encoder``) as embedder 0 and bigG (``text_encoder_2``) as embedder 1; refiner files
    (``text_encoder`` None) hold bigG alone as embedder 0."""
    if text_encoder is None:
        return {"text_encoder_2": openclip_text_layout(text_encoder_2, SDXL_REFINER_BIGG_PREFIX)}
    return {
        "text_encoder": hf_text_layout(text_encoder, SDXL_CLIP_L_PREFIX),
        "text_encoder_2": openclip_text_layout(text_encoder_2, SDXL_BIGG_PREFIX),
    }


def text_layout(config: TextEncoderConfig, kind: str) -> Layout:
    """``kind`` is "hf" (OpenAI CLIP, SD 1) or "openclip" (SD 2)."""
    return openclip_text_layout(config) if kind == "openclip" else hf_text_layout(config)


def default_text_kind(config: TextEncoderConfig) -> str:
    """The layout a writer uses: OpenCLIP for gelu text towers (SD 2 family), transformers otherwise."""
    return "openclip" if config.activation == "gelu" else "hf"
