"""Optional perceptual loss for the autoencoder: LPIPS with a VGG16 trunk (Zhang et al. 2018, Eq. 1).

Used only when ``autoencoder_loss.perceptual_weights`` names a local file; nothing is downloaded. The
file (safetensors, or a weights-only torch file) holds the VGG16 convolutions under torchvision's keys
(``features.{0,2,5,...,28}.weight/bias``) and the LPIPS linear heads under the lpips package's keys
(``lin{0..4}.model.1.weight``), so the two public files can be merged into one by key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.errors import UserError

# VGG16 configuration "D" (Simonyan & Zisserman 2015, Table 1): conv widths per stage; torchvision indices.
VGG_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # the lpips package's input normalisation for [-1, 1] images
LPIPS_SCALE = (0.458, 0.448, 0.450)

PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def vgg_feature_indices() -> list[list[int]]:
    """torchvision ``features.{i}`` indices of the convs per stage (ReLU after each, max-pool between)."""
    index, stages = 0, []
    for stage in VGG_STAGES:
        stages.append([index + 2 * j for j in range(len(stage))])
        index += 2 * len(stage) + 1  # conv + ReLU per layer, then a max-pool
    return stages


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (phi_l(x) - phi_l(y)) ||^2 on unit-normalised VGG features."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleDict()
        in_channels = 3
        for stage, indices in zip(VGG_STAGES, vgg_feature_indices(), strict=True):
            for width, index in zip(stage, indices, strict=True):
                self.convs[str(index)] = nn.Conv2d(in_channels, width, 3, padding=1)
                in_channels = width
        self.heads = nn.ModuleList(nn.Conv2d(stage[-1], 1, 1, bias=False) for stage in VGG_STAGES)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, outputs = (x - self.shift) / self.scale, []
        for s, indices in enumerate(vgg_feature_indices()):
            if s:
                h = F.max_pool2d(h, 2)
            for index in indices:
                h = F.relu(self.convs[str(index)](h))
            outputs.append(h)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance [N] for images in [-1, 1]."""
        total = x.new_zeros(x.shape[0])
        for head, fx, fy in zip(self.heads, self.features(x), self.features(y), strict=True):
            diff = (_unit(fx) - _unit(fy)) ** 2
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def lpips_state_from_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision/lpips keys -> this module's keys."""
    ours = {}
    for key, value in state.items():
        if key.startswith("features."):
            ours["convs." + key.removeprefix("features.")] = value
        elif key.startswith("lin") and key.endswith(".model.1.weight"):
            ours[f"heads.{key[3:].split('.')[0]}.weight"] = value
    return ours


def load_perceptual_loss(path: str | None, device: torch.device) -> PerceptualLoss | None:
    """LPIPS-VGG16 from a local weights file, frozen; None when no path is configured."""
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise UserError(
            f"perceptual-loss weights {file} not found (they are never downloaded; set "
            f"autoencoder_loss.perceptual_weights to a local file or to none)"
        )
    state = _read_state(file)
    model = LPIPS()
    missing = set(model.state_dict()) - set(lpips_state_from_file(state))
    if missing:
        raise UserError(f"{file} lacks LPIPS-VGG16 weights: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(lpips_state_from_file(state), strict=False)
    return model.to(device).eval().requires_grad_(False)


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and the unpickler raise many types for a bad file
        raise UserError(f"cannot read perceptual-loss weights {file}: {error}") from None
