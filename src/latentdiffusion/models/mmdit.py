"""The multimodal diffusion transformer (MMDiT) of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", Sec. 4 and Fig. 2).

The latent is cut into 2x2 patches (a strided conv), given a learned positional embedding cropped from
a ``pos_embed_max_size``^2 grid at its centre, and joined by the projected text states. Every joint
block keeps separate weights for the two token streams (image and context) and lets them attend to each
other in one attention over the concatenated tokens; each stream is modulated by adaLN-Zero (Peebles &
Xie 2023, "Scalable Diffusion Models with Transformers", Sec. 3.2) from c = MLP(sinusoid(t)) + MLP(y),
y the pooled text embedding. The last block's context stream only feeds keys and values to the
attention (its outputs are never read), so it has no output projection, MLP or gates. A final adaLN and
linear layer give each patch's velocity, which is folded back into a latent.

SD3.5 normalises every head's queries and keys with an RMS norm (``qk_norm="rms_norm"``; Large and
Medium) and, in MMDiT-X (Medium), adds to the blocks of ``dual_attention_layers`` a second,
image-only self-attention with its own modulation (shift, scale and gate of the same normalised input).

Module names (state-dict keys):
  patch_embed, pos_embed (buffer [1, M*M, hidden]), time_embed.{linear_1,linear_2},
  pooled_embed.{linear_1,linear_2}, context_embed,
  blocks.{i}.{image,context}.modulation, .attn.{to_q,to_k,to_v,norm_q,norm_k,to_out}, .mlp.{fc1,fc2},
  blocks.{i}.image.attn2 (dual attention blocks), final.{modulation,linear}.
Modulation rows are chunks in the reference's order: shift, scale, gate (attention), shift, scale, gate
(MLP), then shift, scale, gate of attn2; the last context stream and the final layer hold shift, scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.config import MMDiTConfig
from latentdiffusion.models.attention import attention
from latentdiffusion.models.layers import Conv2d, Linear, timestep_embedding
from latentdiffusion.models.unet import TimeEmbedding, _per_sample

NORM_EPS = 1e-6  # the layer norms and the q/k RMS norms of the released models
TIMESTEP_FEATURES = 256  # width of the sinusoidal timestep features
QK_NORMS = (None, "rms_norm")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (Zhang & Sennrich 2019, Eq. 4),
    computed in float32 whatever the input's precision."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight.to(x.dtype)


class StreamAttention(nn.Module):
    """One stream's part of an attention: q/k/v projections (with biases), optional per-head RMS norms
    on q and k, and the output projection (absent in a pre-only stream, whose outputs are not used)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, *, pre_only: bool) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.to_out = None if pre_only else Linear(inner, dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # [N, L, dim] -> 3 x [N, heads, L, head_dim]
        q, k, v = (self._split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def out(self, h: torch.Tensor) -> torch.Tensor:
        # [N, heads, L, head_dim] -> [N, L, dim]
        return self.to_out(h.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention within this stream alone (MMDiT-X's second attention)."""
        return self.out(attention(*self.qkv(x)))


def joint_attention(
    streams: Sequence[StreamAttention], inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Attention over the concatenated tokens of all streams, each projected with its own weights
    (Esser et al. 2024, Fig. 2b); returns each stream's output tokens (None for a pre-only stream)."""
    projected = [stream.qkv(x) for stream, x in zip(streams, inputs, strict=True)]
    q, k, v = (torch.cat(parts, dim=2) for parts in zip(*projected, strict=True))
    h = attention(q, k, v)
    lengths = [x.shape[1] for x in inputs]
    outputs = h.split(lengths, dim=2)
    return [None if s.to_out is None else s.out(o) for s, o in zip(streams, outputs, strict=True)]


class Mlp(nn.Module):
    """Linear, GELU (tanh approximation), Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, per sample (adaLN, Peebles & Xie 2023, Sec. 3.2)."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    return torch.addcmul(shift[:, None], normed, 1 + scale[:, None])


class StreamBlock(nn.Module):
    """One stream of a joint block: the adaLN-Zero modulation, its attention projections, its MLP and,
    in MMDiT-X blocks, an image-only second attention.

    A pre-only stream (the last block's context) has only the shift and scale of its attention input.
    """

    def __init__(self, config: MMDiTConfig, *, pre_only: bool = False, dual: bool = False) -> None:
        super().__init__()
        dim, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        chunks = 2 if pre_only else 9 if dual else 6
        self.modulation = Linear(dim, chunks * dim)
        self.attn = StreamAttention(dim, heads, head_dim, config.qk_norm, pre_only=pre_only)
        self.attn2 = StreamAttention(dim, heads, head_dim, config.qk_norm, pre_only=False) if dual else None
        self.mlp = None if pre_only else Mlp(dim, int(dim * config.mlp_ratio))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The modulated attention input and the remaining modulation chunks, c = SiLU(conditioning)."""
        shift, scale, *rest = self.modulation(c).chunk(self.modulation.out_features // x.shape[-1], dim=1)
        return modulate(x, shift, scale), rest

    def post_attention(self, x: torch.Tensor, h: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
        """x + gate * attention (+ gate2 * attn2), then + gate * MLP; x is the block's input, which MMDiT-X's
        second attention reads (normalised, with its own shift and scale) as the first one does."""
        gate, shift_mlp, scale_mlp, gate_mlp, *second = rest
        out = torch.addcmul(x, gate[:, None], h)
        if self.attn2 is not None:
            shift2, scale2, gate2 = second
            out = torch.addcmul(out, gate2[:, None], self.attn2(modulate(x, shift2, scale2)))
        return torch.addcmul(out, gate_mlp[:, None], self.mlp(modulate(out, shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """An MMDiT block (Esser et al. 2024, Fig. 2b): both streams modulated, one joint attention, then
    each stream's own gated residuals and MLP."""

    def __init__(self, config: MMDiTConfig, index: int) -> None:
        super().__init__()
        self.image = StreamBlock(config, dual=index in config.dual_attention_layers)
        self.context = StreamBlock(config, pre_only=index == config.depth - 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: [N, L, hidden], context: [N, S, hidden], c: [N, hidden] (already through SiLU)
        x_mod, x_rest = self.image.pre_attention(x, c)
        context_mod, context_rest = self.context.pre_attention(context, c)
        streams = (self.context.attn, self.image.attn)
        h_context, h_x = joint_attention(streams, (context_mod, x_mod))
        x = self.image.post_attention(x, h_x, x_rest)
        if h_context is not None:
            context = self.context.post_attention(context, h_context, context_rest)
        return x, context


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its patch's p*p*out_channels values."""

    def __init__(self, dim: int, patch_values: int) -> None:
        super().__init__()
        self.modulation = Linear(dim, 2 * dim)
        self.linear = Linear(dim, patch_values)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(x, shift, scale))


class MMDiT(nn.Module):
    """The SD3 / SD3.5 velocity network v(x, t, context, y), built from an MMDiTConfig.

    ``forward(x, t, context, y, skip_layers=())``: x [N, in_channels, H, W] the unit-scale latent (H and W
    multiples of the patch size, at most ``pos_embed_max_size`` patches), t [N] (or scalar) timesteps in
    0..1000, context [N, S, context_dim] text states, y [N, pooled_dim] pooled text embedding;
    ``skip_layers`` are blocks to leave out (skip-layer guidance). Returns [N, out_channels, H, W].
    """

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        self.patch_embed = Conv2d(config.in_channels, dim, p, stride=p)
        # fixed after training, so a buffer (as in the reference), not a parameter fine-tuning would move
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size**2, dim))
        self.time_embed = TimeEmbedding(TIMESTEP_FEATURES, dim)
        self.pooled_embed = TimeEmbedding(config.pooled_dim, dim)
        self.context_embed = Linear(config.context_dim, dim)
        self.blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final = FinalLayer(dim, p * p * config.out_channels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor,
        skip_layers: Sequence[int] = (),
    ) -> torch.Tensor:
        height, width = self._check_inputs(x, context, y, skip_layers)
        c = F.silu(self.conditioning(x, t, y))  # every modulation reads SiLU(c)
        h = self.embed_patches(x)  # [N, L, hidden]
        context = self.context_embed(context.to(h.dtype))  # [N, S, hidden]
        for index, block in enumerate(self.blocks):
            if index not in skip_layers:
                h, context = block(h, context, c)
        return self.unpatchify(self.final(h, c), height, width)

    def conditioning(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """MLP(sinusoid(t)) + MLP(y) (Esser et al. 2024, Fig. 2a), run in the MLPs' dtype, cast to x's."""
        t = _per_sample(torch.as_tensor(t, device=x.device), x.shape[0])
        dtype = self.time_embed.linear_1.weight.dtype
        emb = self.time_embed(timestep_embedding(t, TIMESTEP_FEATURES).to(dtype))
        y = y.to(x.device, self.pooled_embed.linear_1.weight.dtype).expand(x.shape[0], -1)
        return (emb + self.pooled_embed(y).to(emb.dtype)).to(x.dtype)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, H/p * W/p, hidden] patch tokens (row-major) plus their positions, cut from
        the centre of the positional-embedding grid."""
        h = self.patch_embed(x)  # [N, hidden, H/p, W/p]
        rows, cols = h.shape[-2:]
        size = self.config.pos_embed_max_size
        top, left = (size - rows) // 2, (size - cols) // 2
        grid = self.pos_embed.unflatten(1, (size, size))[:, top : top + rows, left : left + cols]
        # contiguous tokens: every linear layer after this would otherwise copy its transposed input
        tokens = h.flatten(2).transpose(1, 2).contiguous()
        return tokens + grid.flatten(1, 2).to(h.dtype)

    def unpatchify(self, h: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[N, L, p*p*C] (each token's values ordered row, column, channel) -> [N, C, H, W]."""
        p, channels = self.config.patch_size, self.config.out_channels
        h = h.reshape(h.shape[0], height // p, width // p, p, p, channels)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(h.shape[0], channels, height, width)

    def _check_inputs(
        self, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor, skip_layers: Sequence[int]
    ) -> tuple[int, int]:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"x must be [N, {config.in_channels}, H, W], got {list(x.shape)}")
        height, width = x.shape[-2:]
        p, size = config.patch_size, config.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        if max(height, width) > p * size:
            raise ValueError(
                f"latent size {height}x{width} exceeds the positional-embedding grid "
                f"({size}x{size} patches: at most {p * size}x{p * size})"
            )
        if context.ndim != 3 or context.shape[-1] != config.context_dim:
            raise ValueError(f"context must be [N, S, {config.context_dim}], got {list(context.shape)}")
        if y.ndim != 2 or y.shape[1] != config.pooled_dim or y.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"y must be [{x.shape[0]}, {config.pooled_dim}], got {list(y.shape)}")
        unknown = [i for i in skip_layers if not 0 <= i < config.depth]
        if unknown:
            raise ValueError(f"skip_layers {unknown} are not blocks of this MMDiT (0..{config.depth - 1})")
        return height, width


def _check_config(config: MMDiTConfig) -> None:
    if config.qk_norm not in QK_NORMS:
        raise ValueError(f"MMDiTConfig.qk_norm must be one of {QK_NORMS}, got {config.qk_norm!r}")
    if config.depth < 1:
        raise ValueError(f"MMDiTConfig.depth must be at least 1, got {config.depth}")
    outside = [i for i in config.dual_attention_layers if not 0 <= i < config.depth]
    if outside:
        raise ValueError(f"dual_attention_layers {outside} are not blocks of a depth-{config.depth} MMDiT")
