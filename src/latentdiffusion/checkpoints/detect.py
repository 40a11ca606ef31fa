"""Which Stable Diffusion variant a single file holds, from its keys and tensor shapes alone.

Read from shapes: the U-Net's widths, levels, res-blocks per level, attention levels, transformer
depth, context width (``attn2.to_k``), conv or linear transformer projections, input channels (4
text-to-image, 9 inpainting, 7 x4 upscaler) and the upscaler's noise-level embedding; the
autoencoder's widths and latent channels; the text tower's layout (transformers CLIP for SD 1,
OpenCLIP for SD 2), width, depth and context length.

Not in the shapes, so decided by the conventions of the released models unless a CompVis ``.yaml``
says otherwise (see ``checkpoints.compvis``): attention heads (SD 1 and the x4 upscaler: 8 heads per
level; SD 2: 64-wide heads), text heads (64-wide, as in every CLIP), the latent scale (0.18215; x4
upscaler 0.08333), the schedule, and the prediction type, for which ``probe_prediction_type`` runs
the one-probe test other tools use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from latentdiffusion.checkpoints.keymap import first_keys, strip_prefix
from latentdiffusion.checkpoints.original_keys import (
    AUTOENCODER_PREFIX,
    HF_TEXT_PREFIX,
    OPENCLIP_TEXT_PREFIX,
    UNET_PREFIX,
)
from latentdiffusion.config import AutoencoderConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.errors import UserError

Shape = tuple[int, ...]
Shapes = Mapping[str, Shape]

SD1_HEADS = 8
SD2_HEAD_DIM = 64
CLIP_HEAD_DIM = 64
VIT_H_WIDTH, VIT_H_LAYERS = 1024, 24  # OpenCLIP ViT-H/14, the text tower of every SD 2.x model
V_PROBE_THRESHOLD = -1.0


@dataclass(frozen=True)
class DetectedText:
    config: TextEncoderConfig
    kind: str  # "hf" (transformers CLIP names) or "openclip"


def check_stable_diffusion(shapes: Shapes, source: str) -> None:
    """Refuse, with a message that names what the file seems to be, anything but an SD 1.x/2.x file."""
    if f"{UNET_PREFIX}input_blocks.0.0.weight" in shapes:
        return
    keys = list(shapes)
    hints = (
        (lambda k: k.startswith("conditioner."), "an SDXL-family model whose text encoders are incomplete"),
        (lambda k: "lora" in k.lower(), "a LoRA or other add-on, not a full model"),
        (lambda k: k.startswith(("down_blocks.", "up_blocks.", "conv_in.")), "a single diffusers component"),
        (lambda k: k.startswith(("encoder.down.", "decoder.up.")), "a standalone VAE, not a full model"),
    )
    for test, what in hints:
        if any(test(k) for k in keys):
            raise UserError(f"{source} looks like {what}; expected a Stable Diffusion 1.x/2.x checkpoint")
    raise UserError(
        f"{source} is not a Stable Diffusion 1.x/2.x checkpoint: it has no {UNET_PREFIX}* keys "
        f"(it has {first_keys(keys, 3) or 'no tensors'})"
    )


def _indices(shapes: Shapes, prefix: str) -> set[int]:
    """The integers that follow ``prefix`` in keys such as ``prefix + "3.weight"``."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def _need(shapes: Shapes, key: str, source: str) -> Shape:
    try:
        return shapes[key]
    except KeyError:
        raise UserError(f"{source}: unknown architecture, expected a tensor {key!r}") from None


def detect_unet(shapes: Shapes, source: str) -> UNetConfig:
    """The U-Net's architecture from ``model.diffusion_model.*`` shapes (heads by SD convention)."""
    s = strip_prefix(shapes, UNET_PREFIX)
    model_channels, in_channels = _need(s, "input_blocks.0.0.weight", source)[:2]
    blocks = _indices(s, "input_blocks.")
    levels = 1 + sum(f"input_blocks.{n}.0.op.weight" in s for n in blocks)
    per_level, remainder = divmod(max(blocks) + 1, levels)
    if remainder or per_level < 2:
        raise UserError(f"{source}: unknown U-Net layout ({len(blocks)} input blocks over {levels} levels)")
    firsts = [1 + level * per_level for level in range(levels)]
    widths = [_need(s, f"input_blocks.{n}.0.out_layers.3.weight", source)[0] for n in firsts]
    attention_levels = tuple(i for i, n in enumerate(firsts) if f"input_blocks.{n}.1.proj_in.weight" in s)
    mid = "middle_block.1"
    context_dim = _need(s, f"{mid}.transformer_blocks.0.attn2.to_k.weight", source)[1]
    linear = len(_need(s, f"{mid}.proj_in.weight", source)) == 2
    only_cross = tuple(
        level in attention_levels
        and s[f"input_blocks.{n}.1.transformer_blocks.0.attn1.to_k.weight"][1] != width
        for level, (n, width) in enumerate(zip(firsts, widths, strict=True))
    )
    num_class_embeds = _class_embeds(s, source)
    heads = _heads(widths, attention_levels, linear and num_class_embeds is None, source)
    depths = tuple(
        len(_indices(s, f"input_blocks.{n}.1.transformer_blocks.")) if level in attention_levels else 0
        for level, n in enumerate(firsts)
    )
    middle = len(_indices(s, f"{mid}.transformer_blocks."))
    uniform = len(set(depths[level] for level in attention_levels) | {middle}) == 1
    return UNetConfig(
        in_channels=in_channels,
        out_channels=_need(s, "out.2.weight", source)[0],
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=per_level - 1,
        attention_levels=attention_levels,
        num_heads=heads[0],
        head_dim=heads[1],
        transformer_depth=middle if uniform else 1,
        transformer_depths=() if uniform else depths,
        transformer_depth_middle=None if uniform or middle == depths[-1] else middle,
        adm_in_channels=s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else None,
        context_dim=context_dim,
        use_linear_projection=linear,
        only_cross_attention=only_cross if any(only_cross) else (),
        num_class_embeds=num_class_embeds,
    )


def _class_embeds(s: Shapes, source: str) -> int | None:
    """The x4 upscaler's noise-level classes (an nn.Embedding ``label_emb``), if any."""
    return s["label_emb.weight"][0] if "label_emb.weight" in s else None


def _heads(
    widths: list[int], levels: tuple[int, ...], sd2: bool, source: str
) -> tuple[int | None, int | None]:
    """(num_heads, head_dim): SD 2 keeps heads 64 wide, SD 1 and the x4 upscaler use 8 heads."""
    used = [widths[level] for level in levels] + [widths[-1]]
    if sd2 and all(w % SD2_HEAD_DIM == 0 for w in used):
        return None, SD2_HEAD_DIM
    if all(w % SD1_HEADS == 0 for w in used):
        return SD1_HEADS, None
    raise UserError(f"{source}: cannot tell the attention heads; put its CompVis .yaml beside the file")


def detect_autoencoder(shapes: Shapes, source: str) -> AutoencoderConfig:
    """The first stage from ``first_stage_model.*`` shapes."""
    s = strip_prefix(shapes, AUTOENCODER_PREFIX)
    levels = len(_indices(s, "encoder.down."))
    if not levels:
        raise UserError(f"{source} has no first-stage autoencoder ({AUTOENCODER_PREFIX}encoder.*)")
    return AutoencoderConfig(
        in_channels=_need(s, "encoder.conv_in.weight", source)[1],
        out_channels=_need(s, "decoder.conv_out.weight", source)[0],
        latent_channels=_need(s, "decoder.conv_in.weight", source)[1],
        block_channels=tuple(
            _need(s, f"encoder.down.{i}.block.0.conv2.weight", source)[0] for i in range(levels)
        ),
        num_res_blocks=len(_indices(s, "encoder.down.0.block.")),
        use_quant_conv="post_quant_conv.weight" in s,
    )


def detect_text_encoder(shapes: Shapes, source: str, layer: str | None = None) -> DetectedText:
    """The text tower: transformers CLIP names (SD 1) or OpenCLIP names (SD 2).

    ``layer`` ("last" or "penultimate", from a CompVis yaml) says which OpenCLIP layer feeds the
    U-Net; without it SD 2's penultimate layer is used. The ViT-H tower of SD 2.x is recognised with
    its 24 layers or with the 23 that converters keep.
    """
    for root in ("text_model.", ""):  # old transformers saved CLIP without the text_model level
        hf = strip_prefix(shapes, HF_TEXT_PREFIX + root)
        if "embeddings.token_embedding.weight" in hf:
            return DetectedText(_hf_text(hf, source), "hf")
    openclip = strip_prefix(shapes, OPENCLIP_TEXT_PREFIX)
    if "token_embedding.weight" in openclip:
        return DetectedText(_openclip_text(openclip, source, layer), "openclip")
    raise UserError(f"{source} has no text encoder (cond_stage_model.*): not a Stable Diffusion 1.x/2.x file")


def _text_heads(width: int, source: str) -> int:
    if width % CLIP_HEAD_DIM:
        raise UserError(f"{source}: a text encoder {width} wide does not split into 64-wide CLIP heads")
    return width // CLIP_HEAD_DIM


def _hf_text(s: Shapes, source: str) -> TextEncoderConfig:
    vocab_size, width = s["embeddings.token_embedding.weight"]
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_layers=len(_indices(s, "encoder.layers.")),
        num_heads=_text_heads(width, source),
        intermediate_size=_need(s, "encoder.layers.0.mlp.fc1.weight", source)[0],
        max_length=_need(s, "embeddings.position_embedding.weight", source)[0],
        activation="quick_gelu",
    )


def _openclip_text(s: Shapes, source: str, layer: str | None) -> TextEncoderConfig:
    vocab_size, width = s["token_embedding.weight"]
    stored = len(_indices(s, "transformer.resblocks."))
    if layer == "last":
        num_layers, skip = stored, 0
    elif width == VIT_H_WIDTH and stored in (VIT_H_LAYERS - 1, VIT_H_LAYERS):
        num_layers, skip = VIT_H_LAYERS, 1
    else:
        num_layers, skip = stored, 1
    if num_layers - skip < 1:
        raise UserError(f"{source}: the OpenCLIP text encoder has too few layers ({stored})")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_layers=num_layers,
        num_heads=_text_heads(width, source),
        intermediate_size=_need(s, "transformer.resblocks.0.mlp.c_fc.weight", source)[0],
        max_length=_need(s, "positional_embedding", source)[0],
        activation="gelu",
        skip_last_layers=skip,
        pad_token_id=0,
    )


def sgm_clip_text(shapes: Shapes, prefix: str, source: str) -> TextEncoderConfig:
    """SDXL's CLIP ViT-L (transformers names under ``prefix``), read at its penultimate layer."""
    config = _hf_text(strip_prefix(shapes, prefix + "text_model."), source)
    return replace(config, context_from_penultimate=True)


def sgm_openclip_text(shapes: Shapes, prefix: str, source: str) -> TextEncoderConfig:
    """SDXL's OpenCLIP ViT-bigG (under ``prefix``): every layer built, the context read at the
    penultimate one, the pooled output projected by ``text_projection`` [hidden, projection]."""
    s = strip_prefix(shapes, prefix)
    config = _openclip_text(s, source, "last")
    projection = _need(s, "text_projection", source)[1]
    return replace(config, context_from_penultimate=True, projection_dim=projection)


@torch.no_grad()
def probe_prediction_type(unet: torch.nn.Module) -> str:
    """eps or v for an SD 2.x U-Net, by one forward pass (the test of AUTOMATIC1111's web UI).

    Input: a constant 0.5 latent at the last training step t = 999, constant 0.5 context. There x_t is
    almost pure noise, so an eps-model returns roughly its input (mean of ``out - x`` near 0), while a
    v-model (v = alpha eps - sigma x0, Salimans & Ho 2022) returns roughly -x0, far below the input;
    the mean of ``out - x`` below -1 means v-prediction. Meaningful only for trained weights.
    """
    config = unet.config
    parameter = next(unet.parameters())
    options = dict(device=parameter.device, dtype=parameter.dtype)
    x = torch.full((1, config.in_channels, 8, 8), 0.5, **options)
    context = torch.full((1, 2, config.context_dim), 0.5, **options)
    out = unet(x, torch.tensor([999.0], device=parameter.device), context)
    difference = (out.float() - x[:, : config.out_channels].float()).mean().item()
    return "v_prediction" if difference < V_PROBE_THRESHOLD else "epsilon"
