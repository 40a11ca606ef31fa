"""Convolutional building blocks shared by the U-Net and the autoencoder.

The residual block follows Ho et al. 2020 (App. B, the "ResNet block with GroupNorm" of the DDPM
U-Net), itself Wide-ResNet style (Zagoruyko & Komodakis 2016) with GroupNorm (Wu & He 2018) and SiLU;
Rombach et al. 2022 keep it for both the denoiser and the first-stage autoencoder.

``Conv2d`` and ``Linear`` are ``nn.Conv2d`` / ``nn.Linear`` (same parameters, same state-dict keys) that
can run CPU inference on weights pre-packed into oneDNN's blocked layout. A plain CPU convolution
reorders its weight into that layout on every call, which costs more than the arithmetic for the
U-Net's deep levels (few pixels, 1280-2560 channels); packing once removes that cost. Packing is off
until ``set_prepacking(module, True)``, never used while gradients flow, and gives the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's packed CPU kernels take


def _mkldnn_ops() -> object | None:
    """torch.ops.mkldnn where this torch build has oneDNN (the ops inductor uses for frozen CPU graphs)."""
    if not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn


def _weight_key(weight: torch.Tensor, hint: tuple[int, ...]) -> tuple[object, ...]:
    """What a packed copy depends on: the weight's storage, in-place version, dtype, and a shape hint."""
    version = 0 if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, weight.dtype, hint)


def _packable(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in dtypes
        and not (torch.is_grad_enabled() and weight.requires_grad)
    )


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with optional oneDNN weight pre-packing for CPU inference (see the module doc).

    The packed copy is made on the first call for an input shape (the blocked layout oneDNN picks
    depends on it) and replaced when the shape, the weight or its dtype changes; activations run in
    channels_last, the layout oneDNN's CPU convolutions prefer.
    """

    prepack: bool = False
    _packed_weight: tuple[tuple[object, ...], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _mkldnn_ops() if self.prepack else None
        if ops is None or not self._packs(x):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        args = (self.padding, self.stride, self.dilation, self.groups)
        return ops._convolution_pointwise(x, self._packed(ops, x), self.bias, *args, "none", [], "")

    def _packs(self, x: torch.Tensor) -> bool:
        plain = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        return plain and x.dim() == 4 and _packable(x, self.weight, PACKED_DTYPES)

    def _packed(self, ops: object, x: torch.Tensor) -> torch.Tensor:
        key = _weight_key(self.weight, tuple(x.shape))
        cached = self._packed_weight
        if cached is None or cached[0] != key:
            args = (self.padding, self.stride, self.dilation, self.groups, list(x.shape))
            cached = (key, ops._reorder_convolution_weight(self.weight, *args))
            self._packed_weight = cached
        return cached[1]


class Linear(nn.Linear):
    """``nn.Linear`` with optional oneDNN weight pre-packing for CPU inference, float32 or bfloat16. An
    unpacked float32 linear runs through MKL's sgemm; oneDNN's matmul on a packed weight was 10-40% faster
    on the U-Net's shapes (one thread, Zen 4: docs/benchmarks.md)."""

    prepack: bool = False
    _packed_weight: tuple[tuple[object, ...], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _mkldnn_ops() if self.prepack else None
        if ops is None or not _packable(x, self.weight, PACKED_DTYPES):
            return super().forward(x)
        return ops._linear_pointwise(x, self._packed(ops, x), self.bias, "none", [], "")

    def _packed(self, ops: object, x: torch.Tensor) -> torch.Tensor:
        key = _weight_key(self.weight, ())
        cached = self._packed_weight
        if cached is None or cached[0] != key:
            rows = x.numel() // x.shape[-1]  # a size hint only: the packed weight serves any row count
            cached = (key, ops._reorder_linear_weight(self.weight, rows))
            self._packed_weight = cached
        return cached[1]


def set_prepacking(module: nn.Module, enabled: bool) -> None:
    """Turn weight pre-packing on or off for every ``Conv2d`` / ``Linear`` in ``module``; turning it off
    frees the packed copies."""
    for layer in module.modules():
        if isinstance(layer, Conv2d | Linear):
            layer.prepack = enabled
            if not enabled:
                layer._packed_weight = None


def is_prepacked(module: nn.Module) -> bool:
    """True when some ``Conv2d`` / ``Linear`` in ``module`` runs on pre-packed weights."""
    return any(isinstance(layer, Conv2d | Linear) and layer.prepack for layer in module.modules())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [N] -> [N, dim], float32.

    The transformer position encoding of Vaswani et al. 2017 (Sec. 3.5) applied to t as in Ho et al.
    2020, in Stable Diffusion's order [cos, sin] (diffusers: flip_sin_to_cos=True,
    downscale_freq_shift=0): frequencies max_period ** (-k / half) for k in [0, half).
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)  # [half]
    args = t.float()[:, None] * freqs[None]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2 * half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, plus a shortcut.

    ``emb_channels=None`` builds the unconditional block of the autoencoder (no time projection).
    The shortcut is a 1x1 conv only when the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int | None = None,
        *,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None if emb_channels is None else Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, C_in, H, W], emb: [N, E] -> [N, C_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            assert emb is not None, "this ResBlock was built with a time embedding; pass emb"
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """A stride-2 3x3 conv halving H and W.

    ``asymmetric_pad=True`` is the autoencoder's variant: pad right and bottom by one and convolve
    without padding (as in the released first-stage models of Rombach et al. 2022); the U-Net pads
    one pixel on every side.
    """

    def __init__(self, channels: int, *, asymmetric_pad: bool = False) -> None:
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, H, W] -> [N, C, ceil(H / 2), ceil(W / 2)]
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv (avoids checkerboard artefacts of
    transposed convolutions, Odena et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # [N, C, H, W] -> [N, C, 2H, 2W], or [N, C, *size] to meet a skip of odd size
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
