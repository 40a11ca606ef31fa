"""The denoising U-Net of latent diffusion (Rombach et al. 2022, Sec. 3.3 and App. F).

A DDPM-style U-Net (Ho et al. 2020; Dhariwal & Nichol 2021) over latents: residual blocks
conditioned on the timestep embedding, spatial transformers that cross-attend to the text encoder's
states on the levels in ``config.attention_levels``, skip connections from every down-path block
to an up-path block.

SDXL (Podell et al. 2023, Sec. 2.2) adds a second MLP, ``add_embedding``, on the "vector" conditioning y
(pooled text embedding and sinusoidal size/crop micro-conditioning) whose output joins the timestep
embedding, and varies the number of transformer blocks per level (``UNetConfig.depth_at``).

Module names (state-dict keys):
  conv_in, time_embedding.{linear_1,linear_2}, class_embedding, add_embedding.{linear_1,linear_2},
  down_blocks.{i}.resnets.{j}, down_blocks.{i}.attentions.{j}, down_blocks.{i}.downsample.conv,
  mid_block.resnets.{0,1}, mid_block.attention,
  up_blocks.{i}.resnets.{j}, up_blocks.{i}.attentions.{j}, up_blocks.{i}.upsample.conv,
  norm_out, conv_out.
``down_blocks.{i}`` is level i (full resolution first); ``up_blocks.{i}`` runs in execution order,
so ``up_blocks.0`` is the deepest level. Inside a transformer: norm, proj_in,
blocks.{k}.{norm1,attn1,norm2,attn2,norm3,ff.proj_in,ff.proj_out}, proj_out; inside an attention:
to_q, to_k, to_v, to_out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.config import COORDINATE_CHANNELS, UNetConfig
from latentdiffusion.models.attention import SpatialTransformer
from latentdiffusion.models.layers import Conv2d, Downsample, Linear, ResBlock, Upsample, timestep_embedding

# after_layer(path, block, layer, h) -> h: run after each ResBlock (+ transformer) pair of a block, before its
# down/upsample; path "down", "mid" or "up", ``block`` the index in down_blocks / up_blocks (0 for mid).
LayerHook = Callable[[str, int, int, torch.Tensor], torch.Tensor]
AfterLayer = Callable[[int, torch.Tensor], torch.Tensor]  # a LayerHook bound to one block


@dataclass
class FeatureCache:
    """DeepCache state (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free", Sec. 3.2):
    the up-path features that enter the skip branch ``branch`` of the full-resolution level.

    Branch b recomputes the first b full-resolution down blocks and the last b + 1 up blocks (branch 0:
    only conv_in, the last up block and the output head). ``reuse`` selects a shallow call; a full call
    (reuse False) refreshes ``features``.
    """

    branch: int = 0
    features: torch.Tensor | None = None
    reuse: bool = False


def _resblock(config: UNetConfig, in_channels: int, out_channels: int) -> ResBlock:
    emb_channels = 4 * config.model_channels
    return ResBlock(
        in_channels,
        out_channels,
        emb_channels,
        groups=config.norm_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
    )


def _transformer(
    config: UNetConfig, channels: int, depth: int, only_cross_attention: bool
) -> SpatialTransformer:
    heads = config.heads_at(channels)
    return SpatialTransformer(
        channels,
        heads,
        channels // heads,
        config.context_dim,
        depth=depth,
        groups=config.norm_groups,
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast=config.upcast_attention,
    )


class TimeEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features: Linear-SiLU-Linear to 4 * model_channels
    (Ho et al. 2020, App. B). ``cond_channels``: a bias-free projection of an extra condition (LCM's
    guidance embedding) added to the features first."""

    def __init__(self, in_channels: int, emb_channels: int, cond_channels: int | None = None) -> None:
        super().__init__()
        self.linear_1 = Linear(in_channels, emb_channels)
        self.linear_2 = Linear(emb_channels, emb_channels)
        self.cond_proj = None if cond_channels is None else Linear(cond_channels, in_channels, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        # [N, in_channels] (+ proj([N, cond_channels])) -> [N, emb_channels]
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("this UNet takes no timestep_cond (its time_cond_proj_dim is not set)")
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w [N] -> [N, dim]: sin then cos of 1000 w at frequencies
    10000^(-i / (dim/2 - 1)), zero-padded to an odd ``dim`` (VDM's timestep embedding, Kingma et al.
    2021, as the LCM models were distilled with it)."""
    half = dim // 2
    # float32 in the reference's order: angles reach 1000 w, so rounding differences would show
    step = torch.tensor(math.log(10000.0) / (half - 1), dtype=torch.float32)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


class DownLevel(nn.Module):
    """One resolution of the contracting path: ResBlocks, each followed by a spatial transformer on
    attention levels, then an optional stride-2 downsample. Every block output is a skip."""

    def __init__(self, config: UNetConfig, level: int, in_channels: int, *, last: bool) -> None:
        super().__init__()
        channels = config.model_channels * config.channel_mult[level]
        n = config.num_res_blocks
        self.resnets = nn.ModuleList(
            _resblock(config, in_channels if j == 0 else channels, channels) for j in range(n)
        )
        self.attentions = nn.ModuleList()
        if level in config.attention_levels:
            depth, only_cross = config.depth_at(level), config.only_cross_at(level)
            self.attentions.extend(_transformer(config, channels, depth, only_cross) for _ in range(n))
        self.downsample = None if last else Downsample(channels)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        stop: int | None = None,
        after: AfterLayer | None = None,
    ) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, C, H/2, W/2] (or [N, C, H, W] on the last level); appends skips.
        # ``stop``: run only the first ``stop`` ResBlocks and no downsample (DeepCache's shallow branch).
        for j, resnet in enumerate(self.resnets[:stop]):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[j](x, context)
            if after is not None:
                x = after(j, x)
            skips.append(x)
        if self.downsample is not None and stop is None:
            x = self.downsample(x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """The bottleneck: ResBlock, spatial transformer, ResBlock."""

    def __init__(self, config: UNetConfig, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resblock(config, channels, channels) for _ in range(2))
        self.attention = _transformer(config, channels, config.middle_depth, only_cross_attention=False)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, after: AfterLayer | None = None
    ) -> torch.Tensor:
        # [N, C, H, W] -> [N, C, H, W]
        x = self.resnets[0](x, emb)
        x = self.attention(x, context)
        if after is not None:
            x = after(0, x)
        return self.resnets[1](x, emb)


class UpLevel(nn.Module):
    """One resolution of the expanding path: num_res_blocks + 1 ResBlocks, each taking the
    concatenation of the running features and one skip, transformers on attention levels, then an
    optional nearest x2 upsample to the next skip's size."""

    def __init__(
        self, config: UNetConfig, level: int, in_channels: int, skip_channels: list[int], *, last: bool
    ) -> None:
        super().__init__()
        channels = config.model_channels * config.channel_mult[level]
        inputs = [in_channels] + [channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            _resblock(config, c + skip, channels) for c, skip in zip(inputs, skip_channels, strict=True)
        )
        self.attentions = nn.ModuleList()
        if level in config.attention_levels:
            depth, only_cross = config.depth_at(level), config.only_cross_at(level)
            self.attentions.extend(_transformer(config, channels, depth, only_cross) for _ in skip_channels)
        self.upsample = None if last else Upsample(channels)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        skips: list[torch.Tensor],
        start: int = 0,
        stop: int | None = None,
        after: AfterLayer | None = None,
    ) -> torch.Tensor:
        # x: [N, C_in, H, W] -> [N, C, 2H, 2W] (or [N, C, H, W] on the last level); pops skips.
        # ``start`` / ``stop``: run only ResBlocks start..stop-1 (DeepCache splits the last level).
        stop = len(self.resnets) if stop is None else stop
        for j in range(start, stop):
            x = self.resnets[j](torch.cat([x, skips.pop()], dim=1), emb)
            if self.attentions:
                x = self.attentions[j](x, context)
            if after is not None:
                x = after(j, x)
        if self.upsample is not None and stop == len(self.resnets):
            x = self.upsample(x, size=tuple(skips[-1].shape[-2:]))
        return x


def coordinate_maps(x: torch.Tensor) -> torch.Tensor:
    """[N, 2, H, W]: each pixel's x and y position in [-1, 1] (left/top -1, right/bottom +1), the extra
    input channels of ``UNetConfig.coordinate_channels`` (Liu et al. 2018, "An intriguing failing of
    convolutional neural networks and the CoordConv solution", Sec. 4)."""
    n, _, height, width = x.shape
    ys = torch.linspace(-1, 1, height, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1, 1, width, dtype=x.dtype, device=x.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(n, -1, -1, -1)


class ConditioningEmbedding:
    """The timestep (+ vector, + class) embedding shared by the U-Net and its ControlNet copy (a mixin for
    an ``nn.Module`` with a ``config: UNetConfig``): module names time_embedding, class_embedding,
    add_embedding."""

    config: UNetConfig

    def _build_embeddings(self, config: UNetConfig) -> None:
        emb_channels = 4 * config.model_channels
        self.time_embedding = TimeEmbedding(config.model_channels, emb_channels, config.time_cond_proj_dim)
        self.class_embedding = None
        if config.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(config.num_class_embeds, emb_channels)
        self.add_embedding = None
        if config.adm_in_channels is not None:
            self.add_embedding = TimeEmbedding(config.adm_in_channels, emb_channels)

    def embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conditioning vector shared by all ResBlocks: MLP(sinusoid(t) (+ proj(timestep_cond), LCM's
        guidance embedding)) (+ MLP(y), SDXL's vector conditioning) (+ class embedding).

        The MLPs run in their own dtype (the fast path keeps them in float32: they are tiny, and the
        sinusoid of a large t loses its phase in bfloat16); their sum is cast to ``x``'s.
        """
        t = _per_sample(torch.as_tensor(t, device=x.device), x.shape[0])
        features = timestep_embedding(t, self.config.model_channels)
        emb = self.time_embedding(features.to(self.time_embedding.linear_1.weight.dtype), timestep_cond)
        if self.add_embedding is not None:
            emb = emb + self._vector_embedding(y, x).to(emb.dtype)
        elif y is not None:
            raise ValueError("this UNet takes no vector conditioning y (its adm_in_channels is not set)")
        emb = emb.to(x.dtype)
        if self.class_embedding is None:
            return emb
        if class_labels is None:
            raise ValueError("this UNet has a class embedding (num_class_embeds); pass class_labels")
        labels = _per_sample(torch.as_tensor(class_labels, device=x.device), x.shape[0])
        return emb + self.class_embedding(labels).to(emb.dtype)

    def _vector_embedding(self, y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """MLP(y) for y [N or 1, adm_in_channels] (Podell et al. 2023, Sec. 2.2), in the MLP's dtype."""
        width = self.config.adm_in_channels
        if y is None:
            raise ValueError(f"this UNet takes vector conditioning (adm_in_channels={width}); pass y")
        if y.ndim != 2 or y.shape[1] != width or y.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"y must be [{x.shape[0]}, {width}], got {list(y.shape)}")
        y = y.to(x.device, self.add_embedding.linear_1.weight.dtype)
        return self.add_embedding(y.expand(x.shape[0], -1))


class UNet(ConditioningEmbedding, nn.Module):
    """eps/v/x0-prediction network D(x, t, context) of Stable Diffusion, built from a UNetConfig.

    ``forward(x, t, context, class_labels=None, cache=None, y=None)``: x [N, in_channels, H, W] noisy
    latents (plus concatenated conditioning channels for inpainting / upscaling), t [N] or scalar
    timesteps (fractional allowed), context [N, S, context_dim] text states, class_labels [N] integer
    labels (the x4 upscaler's noise level) when ``num_class_embeds`` is set, y [N, adm_in_channels] the
    vector conditioning when ``adm_in_channels`` is set (SDXL). Returns [N, out_channels, H, W].
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        mc, levels = config.model_channels, len(config.channel_mult)
        self.conv_in = Conv2d(config.conv_in_channels, mc, 3, padding=1)
        self._build_embeddings(config)

        self.down_blocks = nn.ModuleList()
        skip_channels, channels = [mc], mc
        for level in range(levels):
            last = level == levels - 1
            self.down_blocks.append(DownLevel(config, level, channels, last=last))
            channels = mc * config.channel_mult[level]
            skip_channels += [channels] * (config.num_res_blocks + (0 if last else 1))

        self.mid_block = MidBlock(config, channels)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            skips = [skip_channels.pop() for _ in range(config.num_res_blocks + 1)]
            self.up_blocks.append(UpLevel(config, level, channels, skips, last=level == 0))
            channels = mc * config.channel_mult[level]

        self.norm_out = nn.GroupNorm(config.norm_groups, mc, eps=config.norm_eps)
        self.conv_out = Conv2d(mc, config.out_channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        cache: FeatureCache | None = None,
        y: torch.Tensor | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        after_layer: LayerHook | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cache`` (DeepCache): a full call stores the deep features in it; a call with
        ``cache.reuse`` set recomputes only the shallow branch around them.

        ``down_residuals`` (one per skip, conv_in's output first) and ``mid_residual`` (ControlNet, Zhang
        et al. 2023, Sec. 3.2) are added to the skips and to the middle block's output, where diffusers'
        ``UNet2DConditionModel`` adds its ``down_block_additional_residuals``.

        ``after_layer`` (a ``LayerHook``) runs extra modules after each block's layers, where AnimateDiff
        (Guo et al. 2024, Sec. 4.2) inserts its motion modules. ``timestep_cond`` [N, time_cond_proj_dim]:
        an LCM-distilled U-Net's guidance embedding (``guidance_embedding``)."""
        controlled = down_residuals is not None or mid_residual is not None
        if controlled and cache is not None:
            raise ValueError("DeepCache (cache) and ControlNet residuals cannot be combined in one call")
        if after_layer is not None and cache is not None:
            raise ValueError("DeepCache (cache) and an after_layer hook cannot be combined in one call")
        emb = self.embed(x, t, class_labels, y, timestep_cond)  # [N, 4 * model_channels]
        if self.config.coordinate_channels:
            x = torch.cat([x, coordinate_maps(x)], dim=1)
        h = self.conv_in(x)  # [N, model_channels, H, W]
        skips = [h]
        if cache is not None and cache.reuse and cache.features is not None:
            return self._shallow(h, emb, context, skips, cache)
        for i, down in enumerate(self.down_blocks):
            h = down(h, emb, context, skips, after=_bind(after_layer, "down", i))
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals has {len(down_residuals)} entries for {len(skips)} skips")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
        # [N, C_deepest, H / 2**(levels-1), ...]
        h = self.mid_block(h, emb, context, _bind(after_layer, "mid", 0))
        if mid_residual is not None:
            h = h + mid_residual.to(h.dtype)
        for i, up in enumerate(self.up_blocks[:-1]):
            h = up(h, emb, context, skips, after=_bind(after_layer, "up", i))
        if cache is None:
            last = len(self.up_blocks) - 1
            h = self.up_blocks[-1](h, emb, context, skips, after=_bind(after_layer, "up", last))
        else:  # the same blocks, split where the shallow branch begins
            split = self._branch_split(cache)
            cache.features = self.up_blocks[-1](h, emb, context, skips, stop=split)
            h = self.up_blocks[-1](cache.features, emb, context, skips, start=split)
        return self.conv_out(F.silu(self.norm_out(h)))  # [N, out_channels, H, W]

    def _shallow(
        self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, skips: list, cache: FeatureCache
    ) -> torch.Tensor:
        """DeepCache's partial inference (Ma et al. 2024, Sec. 3.3, Eq. 7): the first ``branch``
        full-resolution blocks of each path, with the cached up-path features in place of the rest."""
        h = self.down_blocks[0](h, emb, context, skips, stop=cache.branch)
        h = self.up_blocks[-1](cache.features, emb, context, skips, start=self._branch_split(cache))
        return self.conv_out(F.silu(self.norm_out(h)))

    def _branch_split(self, cache: FeatureCache) -> int:
        """Index of the first ResBlock of the last up level that belongs to the shallow branch."""
        blocks = self.config.num_res_blocks
        if not 0 <= cache.branch <= blocks:
            raise ValueError(f"DeepCache branch must be in [0, {blocks}], got {cache.branch}")
        return blocks - cache.branch


def vector_conditioning(pooled: torch.Tensor, time_ids: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's y: the pooled text embedding [N, P] followed by a ``dim``-wide sinusoid of each of the
    micro-conditioning numbers ``time_ids`` [N, K] (original size, crop offsets, target size or
    aesthetic score), as sgm's ``ConcatTimestepEmbedderND`` (Podell et al. 2023, Sec. 2.2).
    Returns float32 [N, P + K * dim].
    """
    # float32 throughout: y feeds the add_embedding MLP, which keeps float32 as the time embedding does
    features = timestep_embedding(time_ids.flatten().to(pooled.device), dim)  # [N * K, dim]
    return torch.cat([pooled.float(), features.reshape(time_ids.shape[0], -1)], dim=1)


def _check_config(config: UNetConfig) -> None:
    levels = len(config.channel_mult)
    if config.transformer_depths and len(config.transformer_depths) != levels:
        raise ValueError(
            f"transformer_depths {config.transformer_depths} needs one entry per level ({levels} levels)"
        )
    shallow = [level for level in config.attention_levels if config.depth_at(level) < 1]
    if shallow or config.middle_depth < 1:
        where = f"attention levels {shallow}" if shallow else "the mid block"
        raise ValueError(f"UNetConfig gives {where} no transformer blocks (depth < 1)")


def _bind(hook: LayerHook | None, path: str, block: int) -> AfterLayer | None:
    return None if hook is None else partial(hook, path, block)


def _per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """A scalar or [1] tensor broadcast to [batch]; a [batch] tensor unchanged."""
    values = values.reshape(-1)
    return values.expand(batch) if values.numel() == 1 else values


def add_coordinate_channels(unet: UNet) -> UNet:
    """A U-Net with ``coordinate_channels`` that computes exactly what ``unet`` computes: the same weights,
    and zero weights in ``conv_in`` for the new input channels, which training then learns to use."""
    if unet.config.coordinate_channels:
        return unet
    parameter = next(unet.parameters())
    grown = UNet(replace(unet.config, coordinate_channels=True)).to(parameter.device, parameter.dtype)
    state = dict(unet.state_dict())
    weight = state["conv_in.weight"]  # [C, in_channels, 3, 3]
    zeros = weight.new_zeros(weight.shape[0], COORDINATE_CHANNELS, *weight.shape[2:])
    state["conv_in.weight"] = torch.cat([weight, zeros], dim=1)
    grown.load_state_dict(state)
    return grown.train(unet.training)
