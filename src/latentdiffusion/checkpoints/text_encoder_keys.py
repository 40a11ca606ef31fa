"""Key tables between ``models.text_encoder.TextEncoder`` and published text-encoder layouts.

Hugging Face transformers ``CLIPTextModel`` (the ``text_encoder/`` folder of a diffusers model) uses
the same names as ours under ``text_model.`` with the layers under ``encoder.``; transformers >= 5
saves the same names without the ``text_model.`` prefix, so both spellings are read.

The OpenCLIP single-file layout of SD 2.x (``cond_stage_model.model.transformer.resblocks.N`` with a
fused ``attn.in_proj_weight``) needs a split as well as a renaming; it belongs in this module as
``OPENCLIP_TEXT`` plus ``from_openclip_state_dict`` (not yet written).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from latentdiffusion.checkpoints.keymap import KeyTable, rename_keys

V = TypeVar("V")

HF_PREFIX = "text_model."

HF_CLIP_TEXT: KeyTable = (
    ("embeddings.", "text_model.embeddings."),
    ("layers.{}.", "text_model.encoder.layers.{}."),
    ("final_layer_norm.", "text_model.final_layer_norm."),
)

# transformers' non-weight entries and the contrastive head, which Stable Diffusion never uses
_UNUSED_HF_KEY = re.compile(r"(^|\.)((position_ids|logit_scale)$|text_projection(\.|$))")
_UNPREFIXED_HF = ("embeddings.", "encoder.", "final_layer_norm.")
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def from_hf_state_dict(state: Mapping[str, V], *, num_layers: int | None = None) -> dict[str, V]:
    """A transformers ``CLIPTextModel`` state dict in our names.

    Drops ``position_ids``, ``text_projection`` and ``logit_scale``. ``num_layers`` keeps only the
    layers below that index, for an encoder that skips its last layers (``len(model.layers)``).
    Keys that no table entry matches keep their names, so strict loading reports them.
    """
    kept = {_with_hf_prefix(k): v for k, v in state.items() if not _UNUSED_HF_KEY.search(k)}
    ours = rename_keys(kept, HF_CLIP_TEXT, reverse=True)
    if num_layers is not None:
        ours = {k: v for k, v in ours.items() if not _is_layer_at_or_after(k, num_layers)}
    return ours


def to_hf_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """Our text encoder state dict in transformers ``CLIPTextModel`` names (with ``text_model.``)."""
    return rename_keys(state, HF_CLIP_TEXT)


def _with_hf_prefix(key: str) -> str:
    return HF_PREFIX + key if key.startswith(_UNPREFIXED_HF) else key


def _is_layer_at_or_after(key: str, num_layers: int) -> bool:
    match = _LAYER_INDEX.match(key)
    return match is not None and int(match.group(1)) >= num_layers
