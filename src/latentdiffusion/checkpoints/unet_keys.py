"""Key table between our UNet's state-dict names and diffusers' ``UNet2DConditionModel``.

Both sides share block indices and parameter shapes; only container names differ (diffusers wraps
single modules in lists: ``downsamplers.0``, ``to_out.0``, ``ff.net.0.proj``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from latentdiffusion.checkpoints.keymap import KeyTable, rename_keys

V = TypeVar("V")

# Where spatial transformers sit (ours, diffusers').
_TRANSFORMERS: KeyTable = (
    ("down_blocks.{}.attentions.{}", "down_blocks.{}.attentions.{}"),
    ("mid_block.attention", "mid_block.attentions.0"),
    ("up_blocks.{}.attentions.{}", "up_blocks.{}.attentions.{}"),
)

# Inside one spatial transformer; the most specific templates first (the first match wins).
_TRANSFORMER_INSIDE: KeyTable = (
    ("blocks.{}.attn{}.to_out", "transformer_blocks.{}.attn{}.to_out.0"),
    ("blocks.{}.ff.proj_in", "transformer_blocks.{}.ff.net.0.proj"),
    ("blocks.{}.ff.proj_out", "transformer_blocks.{}.ff.net.2"),
    ("blocks.{}", "transformer_blocks.{}"),
)

UNET_DIFFUSERS_KEYS: KeyTable = (
    *(
        (f"{ours}.{inner}", f"{theirs}.{inner_theirs}")
        for ours, theirs in _TRANSFORMERS
        for inner, inner_theirs in _TRANSFORMER_INSIDE
    ),
    ("mid_block.attention", "mid_block.attentions.0"),
    ("down_blocks.{}.downsample", "down_blocks.{}.downsamplers.0"),
    ("up_blocks.{}.upsample", "up_blocks.{}.upsamplers.0"),
    ("norm_out", "conv_norm_out"),
)


def from_diffusers_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """A diffusers ``UNet2DConditionModel`` state dict renamed for ``UNet.load_state_dict``."""
    return rename_keys(state, UNET_DIFFUSERS_KEYS, reverse=True)


def to_diffusers_state_dict(state: Mapping[str, V]) -> dict[str, V]:
    """Our UNet state dict renamed to diffusers' ``UNet2DConditionModel`` names."""
    return rename_keys(state, UNET_DIFFUSERS_KEYS)


# A ControlNet (models.controlnet) against diffusers' ``ControlNetModel``: the U-Net's encoder names plus the
# hint encoder and the zero convolutions.
CONTROLNET_DIFFUSERS_KEYS: KeyTable = (
    ("hint_embedding", "controlnet_cond_embedding"),
    ("zero_convs.{}", "controlnet_down_blocks.{}"),
    ("mid_zero_conv", "controlnet_mid_block"),
    *UNET_DIFFUSERS_KEYS,
)


def controlnet_from_diffusers(state: Mapping[str, V]) -> dict[str, V]:
    """A diffusers ``ControlNetModel`` state dict renamed for ``ControlNet.load_state_dict``."""
    return rename_keys(state, CONTROLNET_DIFFUSERS_KEYS, reverse=True)


def controlnet_to_diffusers(state: Mapping[str, V]) -> dict[str, V]:
    return rename_keys(state, CONTROLNET_DIFFUSERS_KEYS)
