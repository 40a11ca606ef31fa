"""Key tables for SD3's MMDiT (``models.mmdit``): diffusers' ``SD3Transformer2DModel`` (the ``transformer/``
folder) and the original single file (``model.diffusion_model.joint_blocks.N.x_block...``), and the
MMDiTConfig that a state dict's shapes or a diffusers config.json describe.

Our module names follow the reference's structure (one module per stream and block) with diffusers'
separate q/k/v projections, so that:
- the original layout is a rename plus the fused ``attn.qkv`` / ``attn2.qkv`` projections (``Fused``);
- the diffusers layout is a rename plus one reordering: diffusers' ``AdaLayerNormContinuous`` (the final
  layer and the last block's pre-only context stream) stores the rows (scale, shift) where the reference
  and we store (shift, scale).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from latentdiffusion.checkpoints.keymap import KeyTable, rename_keys, strip_prefix
from latentdiffusion.checkpoints.layout import Fused, Layout
from latentdiffusion.checkpoints.original_keys import UNET_PREFIX, nest
from latentdiffusion.config import MMDiTConfig
from latentdiffusion.errors import UserError

V = TypeVar("V")
MMDIT_PREFIX = UNET_PREFIX  # "model.diffusion_model.", as the U-Net's
DIFFUSERS_CLASS = "SD3Transformer2DModel"
HEAD_DIM = 64  # every released MMDiT; a state dict shows it only through its q/k norms

# --- diffusers' SD3Transformer2DModel ------------------------------------------------------------------

# Inside the context stream's part of a joint attention: diffusers' "added" projections.
_DIFFUSERS_CONTEXT_ATTENTION: KeyTable = (
    ("to_q", "add_q_proj"),
    ("to_k", "add_k_proj"),
    ("to_v", "add_v_proj"),
    ("norm_q", "norm_added_q"),
    ("norm_k", "norm_added_k"),
    ("to_out", "to_add_out"),
)
MMDIT_DIFFUSERS_KEYS: KeyTable = (
    ("patch_embed", "pos_embed.proj"),
    ("pos_embed", "pos_embed.pos_embed"),
    ("time_embed", "time_text_embed.timestep_embedder"),
    ("pooled_embed", "time_text_embed.text_embedder"),
    ("context_embed", "context_embedder"),
    ("blocks.{}.image.modulation", "transformer_blocks.{}.norm1.linear"),
    ("blocks.{}.context.modulation", "transformer_blocks.{}.norm1_context.linear"),
    # the context entries before the image attention's, which would claim "attn.add_q_proj" on reading
    *(
        (f"blocks.{{}}.context.attn.{ours}", f"transformer_blocks.{{}}.attn.{theirs}")
        for ours, theirs in _DIFFUSERS_CONTEXT_ATTENTION
    ),
    ("blocks.{}.image.attn.to_out", "transformer_blocks.{}.attn.to_out.0"),
    ("blocks.{}.image.attn", "transformer_blocks.{}.attn"),
    ("blocks.{}.image.attn2.to_out", "transformer_blocks.{}.attn2.to_out.0"),
    ("blocks.{}.image.attn2", "transformer_blocks.{}.attn2"),
    ("blocks.{}.image.mlp.fc1", "transformer_blocks.{}.ff.net.0.proj"),
    ("blocks.{}.image.mlp.fc2", "transformer_blocks.{}.ff.net.2"),
    ("blocks.{}.context.mlp.fc1", "transformer_blocks.{}.ff_context.net.0.proj"),
    ("blocks.{}.context.mlp.fc2", "transformer_blocks.{}.ff_context.net.2"),
    ("final.modulation", "norm_out.linear"),
    ("final.linear", "proj_out"),
)
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


def mmdit_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in our names and row order (``MMDiT`` loads it)."""
    return _swap_scale_shift(rename_keys(state, MMDIT_DIFFUSERS_KEYS, reverse=True))


def mmdit_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MMDiT state dict in diffusers' ``SD3Transformer2DModel`` names and row order."""
    return rename_keys(_swap_scale_shift(state), MMDIT_DIFFUSERS_KEYS)


def scale_shift_layers(depth: int) -> tuple[str, str]:
    """Our layers whose rows diffusers stores as (scale, shift): the final modulation and the last
    block's context modulation."""
    return "final.modulation", f"blocks.{depth - 1}.context.modulation"


def swap_halves(value: torch.Tensor) -> torch.Tensor:
    """The two halves of dim 0 exchanged: (shift, scale) <-> (scale, shift)."""
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _swap_scale_shift(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state with the halves of ``scale_shift_layers`` exchanged (the depth is the number of blocks
    present)."""
    indices = [int(m.group(1)) for m in map(_BLOCK_INDEX.match, state) if m]
    roots = tuple(f"{layer}." for layer in scale_shift_layers(max(indices, default=-1) + 1))
    return {k: swap_halves(v) if k.startswith(roots) else v for k, v in state.items()}


# --- the original single file (Stability's mmdit / mmditx) ---------------------------------------------

_ORIGINAL_ATTENTION: KeyTable = (("norm_q", "ln_q"), ("norm_k", "ln_k"), ("to_out", "proj"))
# Inside one stream block (its q/k/v projections are fused, below; its mlp.fc1/fc2 keep their names)
_ORIGINAL_STREAM: KeyTable = (
    ("modulation", "adaLN_modulation.1"),
    *(
        (f"{attn}.{ours}", f"{attn}.{theirs}")
        for attn in ("attn", "attn2")
        for ours, theirs in _ORIGINAL_ATTENTION
    ),
)
_ORIGINAL_STREAMS = (
    ("blocks.{}.image", "joint_blocks.{}.x_block"),
    ("blocks.{}.context", "joint_blocks.{}.context_block"),
)
MMDIT_ORIGINAL_KEYS: KeyTable = (
    ("patch_embed", "x_embedder.proj"),
    ("time_embed.linear_1", "t_embedder.mlp.0"),
    ("time_embed.linear_2", "t_embedder.mlp.2"),
    ("pooled_embed.linear_1", "y_embedder.mlp.0"),
    ("pooled_embed.linear_2", "y_embedder.mlp.2"),
    ("context_embed", "context_embedder"),
    *nest(_ORIGINAL_STREAMS, _ORIGINAL_STREAM),
    ("final.modulation", "final_layer.adaLN_modulation.1"),
    ("final", "final_layer"),
)
MMDIT_ORIGINAL_FUSED = tuple(
    Fused(f"{theirs}.{attn}.qkv.{param}", tuple(f"{ours}.{attn}.to_{p}.{param}" for p in "qkv"))
    for ours, theirs in _ORIGINAL_STREAMS
    for attn in ("attn", "attn2")
    for param in ("weight", "bias")
)


def mmdit_layout(prefix: str = MMDIT_PREFIX) -> Layout:
    """The original single-file layout of an MMDiT under ``prefix`` ("" for a bare transformer file)."""
    return Layout(prefix, MMDIT_ORIGINAL_KEYS, fused=MMDIT_ORIGINAL_FUSED)


# --- the config a file describes -----------------------------------------------------------------------


def mmdit_config_from_shapes(shapes: Mapping[str, Sequence[int]], sample_size: int = 128) -> MMDiTConfig:
    """The MMDiTConfig of a state dict from its keys and shapes, in the original layout (with or without
    ``model.diffusion_model.``), diffusers' or ours.

    Heads are ``HEAD_DIM`` wide unless q/k norms show their width; ``sample_size`` is not stored in the
    weights."""
    ours = _our_names(shapes)
    try:
        return _config_from_our_shapes(ours, sample_size)
    except KeyError as error:
        raise UserError(f"not a complete MMDiT state dict: no {error.args[0]!r} (in our names)") from None
    except (ValueError, IndexError, ZeroDivisionError) as error:  # shapes of the wrong rank or size
        raise UserError(f"not an MMDiT state dict of a usable shape ({error})") from None


def _our_names(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v) for k, v in shapes.items()}
    if any(k.startswith(MMDIT_PREFIX) for k in shapes):
        shapes = strip_prefix(shapes, MMDIT_PREFIX)
    if "x_embedder.proj.weight" in shapes:
        return rename_keys(shapes, MMDIT_ORIGINAL_KEYS, reverse=True)
    if "pos_embed.proj.weight" in shapes:
        return rename_keys(shapes, MMDIT_DIFFUSERS_KEYS, reverse=True)
    if "patch_embed.weight" in shapes:
        return shapes
    raise UserError("not an MMDiT state dict: no patch embedding (x_embedder.proj / pos_embed.proj)")


def _config_from_our_shapes(shapes: Mapping[str, tuple[int, ...]], sample_size: int) -> MMDiTConfig:
    hidden, in_channels, patch_size, _ = shapes["patch_embed.weight"]
    grid = shapes["pos_embed"][1]
    pos_embed_max_size = math.isqrt(grid)
    if pos_embed_max_size**2 != grid:
        raise UserError(f"MMDiT pos_embed holds {grid} positions, not a square grid")
    norms = [v for k, v in shapes.items() if k.endswith(".attn.norm_q.weight")]
    head_dim = norms[0][0] if norms else HEAD_DIM
    if hidden % head_dim:
        raise UserError(f"MMDiT width {hidden} is not a multiple of its head width {head_dim}")
    if shapes["context_embed.weight"][0] != hidden:
        raise UserError("MMDiT context projection is not as wide as the transformer (not supported)")
    return MMDiTConfig(
        in_channels=in_channels,
        out_channels=shapes["final.linear.weight"][0] // patch_size**2,
        patch_size=patch_size,
        depth=1 + max(_block_indices(shapes, "blocks.{}.image.modulation.weight")),
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        context_dim=shapes["context_embed.weight"][1],
        pooled_dim=shapes["pooled_embed.linear_1.weight"][1],
        pos_embed_max_size=pos_embed_max_size,
        sample_size=sample_size,
        qk_norm="rms_norm" if norms else None,
        dual_attention_layers=tuple(_block_indices(shapes, "blocks.{}.image.attn2.to_out.weight")),
        mlp_ratio=shapes["blocks.0.image.mlp.fc1.weight"][0] / hidden,
    )


def _block_indices(shapes: Mapping[str, Any], template: str) -> list[int]:
    pattern = re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))
    return sorted(int(m.group(1)) for m in map(pattern.fullmatch, shapes) if m)


# diffusers' SD3Transformer2DModel defaults (what its config.json means where a key is absent)
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}

_DIFFUSERS_INTS = tuple(k for k, v in _DIFFUSERS_DEFAULTS.items() if isinstance(v, int))


def mmdit_config_from_diffusers(config: Mapping[str, Any], source: str = "config.json") -> MMDiTConfig:
    """Our MMDiTConfig from a diffusers ``transformer/config.json``."""
    name = config.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise UserError(f"{source}: a {name}, not an {DIFFUSERS_CLASS}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    _check_diffusers_types(c, source)
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_projection_dim"] != hidden:
        raise UserError(
            f"{source}: caption_projection_dim {c['caption_projection_dim']} differs from the transformer's "
            f"width {hidden} (not supported)"
        )
    if c["qk_norm"] not in (None, "rms_norm"):
        raise UserError(f"{source}: qk_norm {c['qk_norm']!r} is not supported (only 'rms_norm')")
    return MMDiTConfig(
        in_channels=c["in_channels"],
        out_channels=c["in_channels"] if c["out_channels"] is None else c["out_channels"],
        patch_size=c["patch_size"],
        depth=c["num_layers"],
        num_heads=c["num_attention_heads"],
        head_dim=c["attention_head_dim"],
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        pos_embed_max_size=c["pos_embed_max_size"],
        sample_size=c["sample_size"],
        qk_norm=c["qk_norm"],
        dual_attention_layers=tuple(c["dual_attention_layers"]),
    )


def _check_diffusers_types(c: Mapping[str, Any], source: str) -> None:
    for name in _DIFFUSERS_INTS:
        value = c[name]
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole and not (name == "out_channels" and value is None):
            raise UserError(f"{source}: {name} must be a whole number, got {value!r}")
    layers = c["dual_attention_layers"]
    if not isinstance(layers, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise UserError(f"{source}: dual_attention_layers must be a list of block numbers, got {layers!r}")


def mmdit_config_to_diffusers(config: MMDiTConfig) -> dict[str, Any]:
    """A diffusers ``transformer/config.json`` for ``config`` (diffusers' MLPs are always 4x wide)."""
    if config.mlp_ratio != 4.0:
        raise UserError(f"diffusers' SD3Transformer2DModel has no mlp_ratio {config.mlp_ratio} (only 4)")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_dim,
        "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": config.qk_norm,
    }
