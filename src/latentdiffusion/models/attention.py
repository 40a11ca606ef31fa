"""Attention layers: multi-head (cross-)attention, the transformer block and the spatial transformer.

Scaled dot-product attention is Vaswani et al. 2017 (Eq. 1, Sec. 3.2.2); the cross-attention
conditioning of the U-Net is Rombach et al. 2022 (Sec. 3.3, Eq. 3); the feed-forward uses GEGLU
(Shazeer 2020). All attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so
that PyTorch picks a fused kernel (flash / memory-efficient) where one applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.models import token_merging
from latentdiffusion.models.layers import Conv2d, Linear

# The released SD transformers normalise their input with eps 1e-6 whatever the U-Net's norm_eps.
TRANSFORMER_NORM_EPS = 1e-6
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)
# Largest attention score matrix (in float32 bytes) one SDPA call may build if its kernel is not fused:
# 256 MiB keeps a 1024x1024 SD generation (16384 queries and keys, 8 heads, batch 2) in 64 chunks.
SCORE_BUDGET_BYTES = 2**28


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, upcast: bool = False, budget: int | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1) for q [N, heads, L, d], k, v [N, heads, S, d].

    Runs through ``scaled_dot_product_attention`` (on CPU a blockwise flash kernel that never holds
    the scores), in query chunks small enough that even a kernel that does materialise the
    [N, heads, rows, S] scores keeps them under ``budget`` bytes (float32; default
    SCORE_BUDGET_BYTES). Each query row is independent, so the chunks give the same result.
    ``upcast`` computes float16/bfloat16 inputs in float32.
    """
    budget = SCORE_BUDGET_BYTES if budget is None else budget
    n, heads, length, _ = q.shape
    rows = max(1, budget // (4 * n * heads * k.shape[-2]))
    if rows >= length:
        return _sdpa(q, k, v, upcast)
    return torch.cat([_sdpa(chunk, k, v, upcast) for chunk in q.split(rows, dim=2)], dim=2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool) -> torch.Tensor:
    if upcast and q.dtype in _REDUCED_PRECISION:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1).

    Self-attention when ``context`` is None, otherwise cross-attention from the queries ``x`` to
    ``context`` (Rombach et al. 2022, Eq. 3: Q = W_Q phi(z), K = W_K tau(y), V = W_V tau(y)).
    ``upcast=True`` computes the scores in float32 when the inputs are float16/bfloat16, which the
    SD 2.x checkpoints need to avoid overflow.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        *,
        heads: int = 1,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        head_dim = query_dim // heads if head_dim is None else head_dim
        inner_dim = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_v = Linear(context_dim, inner_dim, bias=qkv_bias)
        self.to_out = Linear(inner_dim, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, L, C], context: [N, S, D] -> [N, L, C]
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))  # [N, heads, L, head_dim]
        k = self._split_heads(self.to_k(context))  # [N, heads, S, head_dim]
        v = self._split_heads(self.to_v(context))
        out = attention(q, k, v, upcast=self.upcast)
        out = out.transpose(1, 2).flatten(2)  # [N, L, heads * head_dim]
        return self.to_out(out)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [N, L, heads * head_dim] -> [N, heads, L, head_dim]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class FeedForward(nn.Module):
    """Position-wise feed-forward with a GEGLU gate: (x W + b) * GELU(x V + c), then a projection
    back (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.proj_in = Linear(dim, 2 * inner_dim)  # value and gate halves in one matmul
        self.dropout = nn.Dropout(dropout)
        self.proj_out = Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, L, dim] -> [N, L, dim]
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(h * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, feed-forward,
    each residual (Vaswani et al. 2017; Rombach et al. 2022, Sec. 3.3).

    ``only_cross_attention=True`` makes the first attention attend to the context as well (the x4
    upscaler's first levels).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        *,
        only_cross_attention: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        attn1_context = context_dim if only_cross_attention else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, attn1_context, heads=heads, head_dim=head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads, head_dim=head_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [N, L, dim], context: [N, S, context_dim] -> [N, L, dim]
        plan = None if self.only_cross_attention else token_merging.plan_for(x)
        if plan is None:
            x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        else:  # self-attention over merged tokens (models.token_merging)
            x = x + plan.unmerge(self.attn1(plan.merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with a residual around it
    (Rombach et al. 2022, Sec. 3.3 and App. F).

    SD 1.x projects in and out with 1x1 convs, SD 2.x with Linear layers
    (``use_linear_projection``); the two are the same map, stored with different weight shapes.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        *,
        depth: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear_projection:
            self.proj_in = Linear(channels, inner_dim)
            self.proj_out = Linear(inner_dim, channels)
        else:
            self.proj_in = Conv2d(channels, inner_dim, 1)
            self.proj_out = Conv2d(inner_dim, channels, 1)
        block_options = dict(only_cross_attention=only_cross_attention, upcast=upcast, dropout=dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner_dim, heads, head_dim, context_dim, **block_options) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W], context: [N, S, context_dim] -> [N, C, H, W]
        height, width = x.shape[-2:]
        h = self._project_in(self.norm(x))  # [N, H*W, inner]
        for block in self.blocks:
            h = block(h, context)
        return x + self._project_out(h, height, width)

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, H, W] -> [N, H*W, inner]
        if self.use_linear_projection:
            return self.proj_in(x.flatten(2).transpose(1, 2))
        return self.proj_in(x).flatten(2).transpose(1, 2)

    def _project_out(self, h: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # [N, H*W, inner] -> [N, C, H, W]
        if self.use_linear_projection:
            return self.proj_out(h).transpose(1, 2).unflatten(2, (height, width))
        return self.proj_out(h.transpose(1, 2).unflatten(2, (height, width)))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, GroupNorm in front and a
    residual around it: the mid-block attention of the first-stage autoencoder (Rombach et al. 2022,
    App. G; the "self-attention block" of Ho et al. 2020, App. B). Its projections carry biases."""

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.attn = Attention(channels, heads=1, head_dim=channels, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, H, W] -> [N, C, H, W]
        n, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [N, H*W, C]
        out = self.attn(tokens).transpose(1, 2).reshape(n, c, height, width)
        return x + out
