"""Key table between our Autoencoder's state-dict names and diffusers' ``AutoencoderKL``.

Parameter shapes agree on both sides. Older diffusers-layout VAEs name the mid-block attention
``query``/``key``/``value``/``proj_attn``; ``from_diffusers_state_dict`` accepts those too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from latentdiffusion.checkpoints.keymap import KeyTable, rename_keys

V = TypeVar("V")

AUTOENCODER_DIFFUSERS_KEYS: KeyTable = (
    *(
        pair
        for part in ("encoder", "decoder")
        for pair in (
            (f"{part}.mid_block.attention.norm", f"{part}.mid_block.attentions.0.group_norm"),
            (f"{part}.mid_block.attention.attn.to_out", f"{part}.mid_block.attentions.0.to_out.0"),
            (f"{part}.mid_block.attention.attn", f"{part}.mid_block.attentions.0"),
            (f"{part}.norm_out", f"{part}.conv_norm_out"),
        )
    ),
    ("encoder.down_blocks.{}.downsample", "encoder.down_blocks.{}.downsamplers.0"),
    ("decoder.up_blocks.{}.upsample", "decoder.up_blocks.{}.upsamplers.0"),
)

# Deprecated diffusers attention names (old name, current name); applied before the table above.
_LEGACY_ATTENTION: KeyTable = tuple(
    (f"{part}.mid_block.attentions.0.{old}", f"{part}.mid_block.attentions.0.{new}")
    for part in ("encoder", "decoder")
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
)


def from_diffusers_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """A diffusers ``AutoencoderKL`` state dict renamed for ``Autoencoder.load_state_dict``."""
    current = rename_keys(state, _LEGACY_ATTENTION)
    return rename_keys(current, AUTOENCODER_DIFFUSERS_KEYS, reverse=True)


def to_diffusers_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """Our Autoencoder state dict renamed to diffusers' ``AutoencoderKL`` names."""
    return rename_keys(state, AUTOENCODER_DIFFUSERS_KEYS)
