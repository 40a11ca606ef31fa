"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder (conv_in, the embeddings, the down path and the middle block)
takes the noisy latent plus a hint image encoded to the latent resolution (Sec. 3.3, the tiny network
E(.) of four convolutions per stride); 1x1 "zero convolutions" (Sec. 3.1, Eq. 2) map each skip and the
middle output to residuals that the frozen U-Net adds to its own (``UNet.forward(down_residuals=,
mid_residual=)``).

Module names (state-dict keys): the U-Net's conv_in, time_embedding, class_embedding, add_embedding,
down_blocks, mid_block; hint_embedding.{conv_in, blocks.{k}, conv_out}; zero_convs.{k} (one per skip,
conv_in's first); mid_zero_conv.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.config import ControlNetConfig
from latentdiffusion.models.layers import Conv2d
from latentdiffusion.models.unet import ConditioningEmbedding, DownLevel, MidBlock, coordinate_maps


class HintEmbedding(nn.Module):
    """The hint encoder: conv-SiLU pairs, a stride-2 conv between stages, then a zero convolution to
    ``model_channels`` (diffusers' ``ControlNetConditioningEmbedding``)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.conv_in = Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in pairwise(channels):
            self.blocks.append(Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        # [N, in, H, W] -> [N, out, H / f, W / f]
        h = F.silu(self.conv_in(hint))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNet(ConditioningEmbedding, nn.Module):
    """``forward(x, t, context, hint, class_labels=None, y=None) -> (down_residuals, mid_residual)``:
    x, t, context, y as ``UNet.forward`` takes them, hint [N, hint_in_channels, H * f, W * f] in [0, 1];
    the residuals are unscaled (the caller applies strength and guess mode)."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.control_config = config
        self.config = unet = config.unet
        mc, levels = unet.model_channels, len(unet.channel_mult)
        self.conv_in = Conv2d(unet.conv_in_channels, mc, 3, padding=1)
        self._build_embeddings(unet)
        self.hint_embedding = HintEmbedding(config.hint_in_channels, config.hint_channels, mc)
        self.down_blocks = nn.ModuleList()
        skip_channels, channels = [mc], mc
        for level in range(levels):
            last = level == levels - 1
            self.down_blocks.append(DownLevel(unet, level, channels, last=last))
            channels = mc * unet.channel_mult[level]
            skip_channels += [channels] * (unet.num_res_blocks + (0 if last else 1))
        self.zero_convs = nn.ModuleList(Conv2d(c, c, 1) for c in skip_channels)
        self.mid_block = MidBlock(unet, channels)
        self.mid_zero_conv = Conv2d(channels, channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        hint: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        emb = self.embed(x, t, class_labels, y)
        if self.config.coordinate_channels:
            x = torch.cat([x, coordinate_maps(x)], dim=1)
        h = self.conv_in(x) + self.hint_embedding(hint.to(x.dtype))  # [N, model_channels, H, W]
        skips = [h]
        for down in self.down_blocks:
            h = down(h, emb, context, skips)
        h = self.mid_block(h, emb, context)
        down = [conv(skip) for conv, skip in zip(self.zero_convs, skips, strict=True)]
        return down, self.mid_zero_conv(h)
