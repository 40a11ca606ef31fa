"""AnimateDiff motion modules (Guo et al. 2024, "AnimateDiff: Animate Your Personalized Text-to-Image
Diffusion Models without Specific Tuning", ICLR, Sec. 4.2 and Fig. 3).

A motion module is a transformer over the *frame* axis: every latent pixel of every sample is a sequence of
F feature vectors, one per frame, with sinusoidal position encodings of the frame index (Vaswani et al.
2017, Sec. 3.5), two self-attention layers and a GEGLU feed-forward. Modules sit after every ResBlock (+
spatial transformer) pair of a frozen text-to-image U-Net, on the frames folded into the batch
(``UNet.forward``'s ``after_layer`` hook); ``proj_out`` starts at zero in training, so a fresh module is the
identity and the U-Net still makes its images.

A module's second attention is temporal self-attention in AnimateDiff's released modules
(``("Temporal_Self", "Temporal_Self")``); with ``MotionConfig.cross_attention_dim`` it is a cross-attention
from the position-encoded frame features to the prompt's text states (the original code's
``"Temporal_Cross"`` block type), so the modules read the prompt directly, not only through the frozen
per-frame features.

Module names (state-dict keys) of ``MotionModules``:
  down_blocks.{i}.{j}, mid_block.{j}, up_blocks.{i}.{j}: one ``TemporalTransformer`` per U-Net layer
  (``up_blocks.{i}`` in execution order, deepest first, as the U-Net's); inside one: norm, proj_in,
  blocks.{k}.{norm1, attn1, norm2, attn2, norm3, ff.proj_in, ff.proj_out, pos_embed.pe}, proj_out, and
  with ``spacetime_conv`` spacetime_conv.{norm, conv}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from latentdiffusion.config import UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.attention import Attention, FeedForward
from latentdiffusion.models.layers import Linear
from latentdiffusion.models.unet import LayerHook

# AnimateDiff's temporal transformers normalise their input with GroupNorm eps 1e-6.
MOTION_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MotionConfig:
    """The shape of a set of motion modules (diffusers' ``MotionAdapter`` config, reduced to what the
    released files vary): one module width per U-Net level, ``layers`` modules per down level (one more
    per up level, as the U-Net's up levels have one more ResBlock), one in the middle block when
    ``mid_block`` (v2), ``depth`` transformer blocks per module, ``max_frames`` position encodings (the
    frames one call can see: 24 for v1, 32 for v2/v3). ``cross_attention_dim``: the width of the text states
    that each block's second attention attends to (None: self-attention, as every released module).
    ``noise_correlation``: the alpha of the mixed noise prior the modules were trained with (see
    ``mixed_noise``; 0: every frame's noise independent, as AnimateDiff); clips are sampled from the same
    prior. ``first_frame``: the modules animate a given first frame (image-to-video): in every U-Net call
    frame 0 is that frame's clean latent at timestep 0 (``VideoUNet``'s ``first_frame``), and the other
    frames are denoised around it. ``spacetime_conv``: each module starts with a residual 3x3x3
    convolution over (frames, height, width) (``SpacetimeConv``), a path from every latent pixel of one
    frame to the neighbouring pixels of the next; not in AnimateDiff's releases."""

    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers: int = 2
    mid_block: bool = False
    heads: int = 8
    norm_groups: int = 32
    max_frames: int = 32
    depth: int = 1
    cross_attention_dim: int | None = None
    noise_correlation: float = 0.0
    first_frame: bool = False
    spacetime_conv: bool = False

    def check_fits(self, unet: UNetConfig, source: str = "motion module") -> None:
        """A clear error unless these modules fit the U-Net's levels, widths and layers."""
        widths = tuple(unet.model_channels * m for m in unet.channel_mult)
        if widths != self.block_channels or unet.num_res_blocks != self.layers:
            raise UserError(
                f"{source} is made for a U-Net with level widths {list(self.block_channels)} and "
                f"{self.layers} ResBlocks per level, this model has {list(widths)} and "
                f"{unet.num_res_blocks}: use a motion module of this model's family (SD 1.5 for the "
                "released AnimateDiff v1/v2/v3 modules)"
            )
        if self.cross_attention_dim not in (None, unet.context_dim):
            raise UserError(
                f"{source} attends to text states of width {self.cross_attention_dim}, this model's are "
                f"{unet.context_dim} wide: use a motion module trained for this model"
            )


def check_noise_correlation(alpha: object, name: str) -> float:
    """``alpha`` of a mixed noise prior as a float, or one clear error naming ``name``: a finite number >= 0
    (a string is read as a number, as the module files' metadata holds it)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value < math.inf:
        raise UserError(f"{name} must be a number >= 0, got {alpha!r}")
    return value


def mixed_noise(frames: torch.Tensor, shared: torch.Tensor, alpha: float) -> torch.Tensor:
    """The mixed noise prior of Ge et al. 2023 ("Preserve Your Own Correlation", Sec. 3.2): each frame's
    noise is ``(alpha * shared + frame) / sqrt(1 + alpha^2)``, so every frame stays standard normal while
    two frames of a clip correlate by ``alpha^2 / (1 + alpha^2)``; frames [..., F, ...] and shared [..., 1,
    ...] broadcast along the frame axis. Clips whose frames start alike leave the motion modules only the
    change between frames to draw, not the agreement of independently placed frames."""
    return (alpha * shared + frames) / math.sqrt(1.0 + alpha * alpha)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[1, length, dim] position encodings (Vaswani et al. 2017, Sec. 3.5): sin at even, cos at odd
    channels, wavelengths from 2 pi to 10000 * 2 pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * frequency)
    pe[0, :, 1::2] = torch.cos(position * frequency)
    return pe


class PositionalEncoding(nn.Module):
    """Adds the frame-index encoding to a [N, F, dim] sequence. The table is a state-dict entry (the files
    carry it; extended-context modules ship their own, longer tables)."""

    def __init__(self, dim: int, max_frames: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_frames, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        if frames > self.pe.shape[1]:
            raise UserError(
                f"{frames} frames at once, but the motion module encodes at most {self.pe.shape[1]}: "
                "use sliding context windows (context=16)"
            )
        return x + self.pe[:, :frames].to(x.dtype)


class TemporalBlock(nn.Module):
    """Pre-norm transformer block over frames: two attentions (each on the position-encoded, normalised
    input) and a GEGLU feed-forward, each residual (AnimateDiff's ``TemporalTransformerBlock``). The second
    attention is self-attention (the default ("Temporal_Self", "Temporal_Self")) or, with ``context_dim``,
    cross-attention to the text states ("Temporal_Cross")."""

    def __init__(self, dim: int, heads: int, max_frames: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.cross = context_dim is not None
        self.pos_embed = PositionalEncoding(dim, max_frames)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B * H * W, F, dim] (sample-major), context: [B, S, D] -> [B * H * W, F, dim]
        x = x + self.attn1(self.pos_embed(self.norm1(x)))
        h = self.pos_embed(self.norm2(x))
        if self.cross:
            # every (pixel, frame) query of a sample attends to the same text states, so one cross-attention
            # over the sample's H * W * F queries equals the per-pixel ones without copying the states
            h = self.attn2(h.reshape(context.shape[0], -1, h.shape[-1]), context).reshape(x.shape)
        else:
            h = self.attn2(h)
        x = x + h
        return x + self.ff(self.norm3(x))


class SpacetimeConv(nn.Module):
    """A residual 3x3x3 convolution over (frames, height, width) after GroupNorm and SiLU (the temporal
    convolution layers of Blattmann et al. 2023, "Align your Latents", Sec. 3.1, here spatial as well).
    Temporal attention mixes one latent pixel's frames only, so content that moves across pixels has to
    travel through the frozen spatial layers; this layer lets frame f + 1 read the neighbourhood of frame f
    directly. Its convolution starts at zero: a new layer is the identity."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=MOTION_NORM_EPS)
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        # x: [B * F, C, H, W], frames folded into the batch -> the same shape
        h = x.unflatten(0, (x.shape[0] // frames, frames)).transpose(1, 2)  # [B, C, F, H, W]
        h = self.conv(nn.functional.silu(self.norm(h)))
        return x + h.transpose(1, 2).reshape(x.shape)


class TemporalTransformer(nn.Module):
    """One motion module: GroupNorm over (channels, frames, pixels), each pixel's frames as a sequence,
    ``depth`` temporal blocks, and a residual around it (Guo et al. 2024, Sec. 4.2); with
    ``MotionConfig.spacetime_conv`` a ``SpacetimeConv`` runs first."""

    def __init__(self, channels: int, config: MotionConfig) -> None:
        super().__init__()
        self.spacetime_conv = SpacetimeConv(channels, config.norm_groups) if config.spacetime_conv else None
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=MOTION_NORM_EPS)
        self.proj_in = Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TemporalBlock(channels, config.heads, config.max_frames, config.cross_attention_dim)
            for _ in range(config.depth)
        )
        self.proj_out = Linear(channels, channels)
        # zero output: a new module is the identity, so training starts from the image model's behaviour
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, frames: int, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B * F, C, H, W], frames folded into the batch; context: [B, S, D] -> [B * F, C, H, W]
        if self.spacetime_conv is not None:
            x = self.spacetime_conv(x, frames)
        n, channels, height, width = x.shape
        batch = n // frames
        h = self.norm(x.unflatten(0, (batch, frames)).transpose(1, 2))  # [B, C, F, H, W]
        h = h.permute(0, 3, 4, 2, 1).reshape(batch * height * width, frames, channels)
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context)
        h = self.proj_out(h)  # [B * H * W, F, C]
        h = h.reshape(batch, height, width, frames, channels).permute(0, 3, 4, 1, 2)
        return x + h.reshape(n, channels, height, width)


class MotionModules(nn.Module):
    """Every motion module of one U-Net (diffusers' ``MotionAdapter``), built from a MotionConfig.
    ``hook(frames)`` is the U-Net's ``after_layer`` hook that runs them."""

    def __init__(self, config: MotionConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.block_channels

        def modules(width: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(TemporalTransformer(width, config) for _ in range(count))

        self.down_blocks = nn.ModuleList(modules(c, config.layers) for c in channels)
        self.mid_block = modules(channels[-1], 1) if config.mid_block else None
        self.up_blocks = nn.ModuleList(modules(c, config.layers + 1) for c in reversed(channels))

    def module_at(self, path: str, block: int, layer: int) -> TemporalTransformer | None:
        if path == "mid":
            return None if self.mid_block is None else self.mid_block[layer]
        return (self.down_blocks if path == "down" else self.up_blocks)[block][layer]

    def hook(self, frames: int, context: torch.Tensor | None = None) -> LayerHook:
        """The ``after_layer`` hook for a U-Net call on ``frames`` frames folded into its batch; ``context``
        [B, S, D]: each sample's text states, which modules with cross-attention read."""
        if self.config.cross_attention_dim is not None and context is None:
            raise ValueError("these motion modules attend to the prompt: pass its text states (context)")

        def after_layer(path: str, block: int, layer: int, h: torch.Tensor) -> torch.Tensor:
            module = self.module_at(path, block, layer)
            return h if module is None else module(h, frames, context)

        return after_layer


WEIGHTINGS = ("pyramid", "uniform")


@dataclass(frozen=True)
class ContextWindows:
    """Sliding context windows over the frames (AnimateDiff-Evolved's "standard static" schedule): windows
    of ``length`` frames, ``overlap`` frames shared by neighbours, the last one aligned to the clip's end;
    every window is denoised as a clip of its own and each frame's predictions are averaged, weighted
    ``uniform``-ly or by a ``pyramid`` (a frame's weight in a window: its distance to the window's nearer
    end, counted from 1), which fades each window in and out so that seams do not show."""

    length: int = 16
    overlap: int = 4
    weighting: str = "pyramid"

    def validate(self, max_frames: int) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise UserError(f"context must be a whole number of frames >= 1, got {self.length!r}")
        if self.length > max_frames:
            raise UserError(f"context {self.length} is longer than the motion module's {max_frames} frames")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int):
            raise UserError(f"overlap must be a whole number of frames, got {self.overlap!r}")
        if not 0 <= self.overlap < self.length:
            raise UserError(
                f"overlap must be in [0, context - 1] = [0, {self.length - 1}], got {self.overlap}"
            )
        if self.weighting not in WEIGHTINGS:
            raise UserError(
                f"unknown window weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}"
            )

    def windows(self, frames: int) -> list[list[int]]:
        """The frame indices of each window (one window when the clip fits in one)."""
        if frames <= self.length:
            return [list(range(frames))]
        stride = self.length - self.overlap
        starts = [*range(0, frames - self.length, stride), frames - self.length]
        return [list(range(start, start + self.length)) for start in starts]

    def weights(self, size: int) -> torch.Tensor:
        """[size] weights of a window's frames."""
        if self.weighting == "uniform":
            return torch.ones(size)
        index = torch.arange(size, dtype=torch.float32)
        return torch.minimum(index + 1, size - index)


class VideoUNet(nn.Module):
    """A text-to-image U-Net with motion modules, as a network over clips: ``forward(x, t, context)`` takes
    x [B, C, F, H, W], t [B] and context [B, S, D], folds the frames into the batch for the U-Net (every
    frame gets its sample's timestep and text states), and the motion modules unfold them. With
    ``windows``, a clip longer than one window is denoised window by window (``ContextWindows``).

    ``first_frame`` [B, C, H, W] (a keyword beside the conditioning, for modules with
    ``MotionConfig.first_frame``): each sample's clean first frame, which replaces frame 0 of x and is
    seen at timestep 0 (clean), so the other frames are denoised as the continuation of that frame. The
    prediction for frame 0 is then of no use; callers keep their known frame."""

    def __init__(self, unet: nn.Module, motion: MotionModules, windows: ContextWindows | None = None) -> None:
        super().__init__()
        motion.config.check_fits(unet.config)
        self.unet = unet
        self.motion = motion
        self.windows = windows

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        # [B, C, F, H, W] -> [B, C_out, F, H, W]
        frames = x.shape[2]
        if cond.get("first_frame") is not None:
            check_first_frame_windows(frames, self.windows)
        if self.windows is None or frames <= self.windows.length:
            check_frames(frames, self.motion.config.max_frames)
            return self._clip(x, t, cond)
        out, total = None, torch.zeros(frames, device=x.device)
        for window in self.windows.windows(frames):
            weight = self.windows.weights(len(window)).to(x.device)
            prediction = self._clip(x[:, :, window], t, cond)
            if out is None:  # float32 sums, whatever the network's precision
                out = prediction.new_zeros(*prediction.shape[:2], frames, *prediction.shape[3:]).float()
            out[:, :, window] += prediction.float() * weight[:, None, None]
            total[window] += weight
        return (out / total[:, None, None]).to(prediction.dtype)

    def _clip(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, frames = x.shape[0], x.shape[2]
        cond = dict(cond)
        first_frame = cond.pop("first_frame", None)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch).repeat_interleave(frames)
        if first_frame is not None:  # frame 0 is the given clean frame, at timestep 0
            x = torch.cat([first_frame.to(x.dtype)[:, :, None], x[:, :, 1:]], dim=2)
            t = t.unflatten(0, (batch, frames)).clone()
            t[:, 0] = 0
            t = t.flatten()
        folded = x.transpose(1, 2).flatten(0, 1)  # [B * F, C, H, W], frame-major within a sample
        per_frame = {k: _per_frame(v, batch, frames) for k, v in cond.items()}
        hook = self.motion.hook(frames, cond.get("context"))
        out = self.unet(folded, t, after_layer=hook, **per_frame)
        return out.unflatten(0, (batch, frames)).transpose(1, 2)


def check_frames(frames: int, max_frames: int) -> None:
    if frames > max_frames:
        raise UserError(
            f"{frames} frames, but the motion module sees at most {max_frames} at once: use sliding context "
            "windows (context=16, overlap=4; ldm video --context 16) or fewer frames"
        )


def check_first_frame_windows(frames: int, windows: ContextWindows | None) -> None:
    """A clip with a given first frame is one window at most: sliding windows do not carry that frame."""
    if windows is not None and frames > windows.length:
        raise UserError(
            f"{frames} frames with a first frame need sliding context windows of {windows.length}, which "
            f"do not carry the first frame yet: make at most {windows.length} frames"
        )


def _per_frame(value: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """A per-sample conditioning tensor [B, ...] repeated for each sample's frames [B * F, ...]."""
    if isinstance(value, torch.Tensor) and value.shape[:1] == (batch,):
        return value.repeat_interleave(frames, dim=0)
    return value
