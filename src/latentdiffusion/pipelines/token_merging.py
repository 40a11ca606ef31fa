"""Token merging in a request's U-Net calls (``generate(token_merging=0.5)``, ``--token-merging 0.5``):
the wrapper that turns ``models.token_merging`` on around each call.

Merged levels: the U-Net's finest attention level (SD 1.x/2.x: the full-resolution one, as the method's
default; SDXL, whose first level has no attention: the one below it), where the attention over the most
tokens runs.
"""

from __future__ import annotations

import torch
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.config import UNetConfig
from latentdiffusion.models.token_merging import TokenMerging, merging_tokens, validate_ratio


def finest_attention_downsample(config: UNetConfig) -> int:
    """How many times the finest U-Net level with self-attention is downsampled from the latent."""
    levels = [level for level in config.attention_levels if config.depth_at(level) > 0]
    return 2 ** min(levels) if levels else 1


class TokenMergingUNet(nn.Module):
    """``unet`` with every call's self-attention run over merged tokens (``settings``)."""

    def __init__(self, unet: nn.Module, settings: TokenMerging) -> None:
        super().__init__()
        self.unet = unet
        self.settings = settings

    @property
    def config(self):
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, *args, **kwargs):
        timestep = float(torch.as_tensor(t).flatten()[0])
        with merging_tokens(self.settings, tuple(x.shape[-2:]), timestep):
            return self.unet(x, t, context, *args, **kwargs)


def merging_parameters(ratio: float | None) -> dict[str, float]:
    """The PNG-info setting of a request's token merging (none when off)."""
    return {"Token merging ratio": ratio} if ratio else {}


def with_token_merging(components: Components, ratio: float | None) -> Components:
    """A copy of ``components`` whose U-Net merges ``ratio`` of the finest attention level's tokens
    (None or 0: ``components``)."""
    if ratio is None:
        return components
    validate_ratio(ratio)
    if ratio == 0:
        return components
    unet = components.unet  # refuses families without a U-Net
    settings = TokenMerging(float(ratio), max_downsample=finest_attention_downsample(unet.config))
    return components.with_modules(unet=TokenMergingUNet(unet, settings))
