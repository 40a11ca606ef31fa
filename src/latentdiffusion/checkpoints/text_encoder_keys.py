"""Key tables between ``models.text_encoder.TextEncoder`` and published text-encoder layouts.

Hugging Face transformers ``CLIPTextModel`` (the ``text_encoder/`` folder of a diffusers model) uses
the same names as ours under ``text_model.`` with the layers under ``encoder.``; transformers >= 5
saves the same names without the ``text_model.`` prefix, so both spellings are read.

The OpenCLIP layout of SD 2.x single files (``cond_stage_model.model.``: ``token_embedding``,
``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}``,
``ln_final``) stores q, k and v as one fused ``attn.in_proj_weight`` / ``in_proj_bias`` (torch's
``nn.MultiheadAttention``), so it needs a split as well as a renaming: ``OPENCLIP_TEXT`` plus
``OPENCLIP_FUSED`` drive the generic ``checkpoints.layout`` conversion.

A text encoder with a ``projection_dim`` (SDXL's bigG, transformers' ``CLIPTextModelWithProjection``)
keeps CLIP's ``text_projection``: transformers stores it as our Linear weight [projection, hidden] under
``text_projection.weight``; OpenCLIP as a bare parameter [hidden, projection] applied as ``x @ W``, so
that layout transposes it. Encoders without one drop it, as Stable Diffusion 1/2 never use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from latentdiffusion.checkpoints.keymap import KeyTable, rename_keys
from latentdiffusion.checkpoints.layout import Fused, Layout, read_layout, write_layout

V = TypeVar("V")

HF_PREFIX = "text_model."

HF_CLIP_TEXT: KeyTable = (
    ("embeddings.", "text_model.embeddings."),
    ("layers.{}.", "text_model.encoder.layers.{}."),
    ("final_layer_norm.", "text_model.final_layer_norm."),
)

# transformers' non-weight entries and the contrastive head, which Stable Diffusion 1/2 never use
_UNUSED_HF_KEY = re.compile(r"(^|\.)((position_ids|logit_scale)$|text_projection(\.|$))")
_UNUSED_HF_KEY_WITH_PROJECTION = re.compile(r"(^|\.)(position_ids|logit_scale)$")
_UNPREFIXED_HF = ("embeddings.", "encoder.", "final_layer_norm.")
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def from_hf_state_dict(
    state: Mapping[str, V], *, num_layers: int | None = None, projection: bool = False
) -> dict[str, V]:
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict in our names.

    Drops ``position_ids``, ``logit_scale`` and, unless ``projection`` (the encoder has a
    ``projection_dim``), ``text_projection``. ``num_layers`` keeps only the layers below that index,
    for an encoder that skips its last layers (``len(model.layers)``). Keys that no table entry
    matches keep their names, so strict loading reports them.
    """
    unused = _UNUSED_HF_KEY_WITH_PROJECTION if projection else _UNUSED_HF_KEY
    kept = {with_hf_prefix(k): v for k, v in state.items() if not unused.search(k)}
    ours = rename_keys(kept, HF_CLIP_TEXT, reverse=True)
    if num_layers is not None:
        ours = {k: v for k, v in ours.items() if not _is_layer_at_or_after(k, num_layers)}
    return ours


def to_hf_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """Our text encoder state dict in transformers ``CLIPTextModel`` names (with ``text_model.``);
    ``text_projection.weight``, if any, keeps its name, as in ``CLIPTextModelWithProjection``."""
    return rename_keys(state, HF_CLIP_TEXT)


def with_hf_prefix(key: str) -> str:
    return HF_PREFIX + key if key.startswith(_UNPREFIXED_HF) else key


def _is_layer_at_or_after(key: str, num_layers: int) -> bool:
    match = _LAYER_INDEX.match(key)
    return match is not None and int(match.group(1)) >= num_layers


OPENCLIP_TEXT: KeyTable = (
    ("embeddings.token_embedding", "token_embedding"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("layers.{}.layer_norm1", "transformer.resblocks.{}.ln_1"),
    ("layers.{}.layer_norm2", "transformer.resblocks.{}.ln_2"),
    ("layers.{}.self_attn.out_proj", "transformer.resblocks.{}.attn.out_proj"),
    ("layers.{}.mlp.fc1", "transformer.resblocks.{}.mlp.c_fc"),
    ("layers.{}.mlp.fc2", "transformer.resblocks.{}.mlp.c_proj"),
    ("final_layer_norm", "ln_final"),
)
OPENCLIP_FUSED = tuple(
    Fused(
        f"transformer.resblocks.{{}}.attn.in_proj_{kind}",
        tuple(f"layers.{{}}.self_attn.{p}_proj.{kind}" for p in "qkv"),
    )
    for kind in ("weight", "bias")
)
OPENCLIP_PROJECTION: KeyTable = (("text_projection.weight", "text_projection"),)
# the contrastive head and, in some files, the image tower: Stable Diffusion 1/2 use neither
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "visual", "attn_mask")


def openclip_layout(
    built_layers: int, stored_layers: int = 0, prefix: str = "", *, projection: bool = False
) -> Layout:
    """The OpenCLIP text tower; stored layers from ``built_layers`` on (the skipped ones) are dropped,
    and so is ``text_projection`` unless ``projection`` (the encoder has a ``projection_dim``)."""
    skipped = tuple(f"transformer.resblocks.{n}" for n in range(built_layers, stored_layers))
    if not projection:
        return Layout(prefix, OPENCLIP_TEXT, OPENCLIP_FUSED, ignored=OPENCLIP_UNUSED + skipped)
    unused = tuple(k for k in OPENCLIP_UNUSED if k != "text_projection") + skipped
    table = OPENCLIP_TEXT + OPENCLIP_PROJECTION
    transposed = frozenset({"text_projection.weight"})
    return Layout(prefix, table, OPENCLIP_FUSED, transposed=transposed, ignored=unused)


def from_openclip_state_dict(
    state: Mapping[str, V], *, num_layers: int, projection: bool = False
) -> dict[str, V]:
    """An OpenCLIP text-tower state dict (no prefix) in our names, keeping layers below ``num_layers``
    (and ``text_projection``, transposed, if ``projection``)."""
    stored = 1 + max(
        (int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")), default=-1
    )
    return read_layout(state, openclip_layout(num_layers, stored, projection=projection))


def to_openclip_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """Our text encoder state dict in OpenCLIP names, q/k/v fused into ``in_proj`` and a projection, if
    any, transposed into OpenCLIP's bare ``text_projection``."""
    return write_layout(state, openclip_layout(0, projection="text_projection.weight" in state))
