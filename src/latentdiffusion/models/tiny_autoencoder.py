"""Tiny autoencoders (TAESD, Ollin Boer Bohan 2023): small distilled stand-ins for Stable Diffusion's
autoencoder that map images to the model's diffusion-space latents and back at a fraction of the cost.

Both halves are plain stacks of 3x3 convolutions and residual blocks (``TinyBlock``) with stride-2
convolutions down and nearest-neighbour upsampling up; no attention, no normalisation. The decoder
squashes its input with 3 tanh(z / 3) first (``SoftClamp``). They were distilled on the *scaled*
latents the diffusion model works on (z = (E(x) - shift) * scale), so they take and return those
directly: the family's latent scale and shift never enter here. (ComfyUI applies them around its raw
latents to reach the same space; diffusers' pipelines divide by the tiny autoencoder's own
``scaling_factor``, 1.0 for taesd / taesdxl.) The latent magnitude 3 and shift 0.5 of diffusers'
``AutoencoderTiny`` only serve to store latents as 8-bit images and are not part of encode / decode.

The convolutions are ``models.layers.Conv2d``, so the precisions that pack the autoencoder's weights for
oneDNN (fp32-fast, bf16: ``pipelines.precision``) pack a tiny one's as well.

The modules are ``nn.Sequential`` stacks laid out as the original ``taesd_encoder`` / ``taesd_decoder``
files are (their keys are ours: ``1.conv.0.weight``); ``checkpoints.tiny_autoencoder_keys`` reads the
original and diffusers layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentdiffusion.errors import UserError
from latentdiffusion.models.layers import Conv2d


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """The shape of a TAESD: per stage, its width and number of blocks (encoder from the image side,
    decoder from the latent side). TAESD for SD 1.x/2.x and SDXL: 4 latent channels; SD3 and FLUX: 16."""

    latent_channels: int = 4
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    upsampling_factor: int = 2  # each decoder stage but the last upsamples by this

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side of the encoder (every stage after the first halves the image)."""
        return 2 ** (len(self.encoder_blocks) - 1)

    @property
    def upsampling_total(self) -> int:
        """Image side / latent side of the decoder."""
        return self.upsampling_factor ** (len(self.decoder_blocks) - 1)


def conv3x3(c_in: int, c_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """3 tanh(z / 3): the decoder's smooth limit of its input to (-3, 3)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class TinyBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + skip(x)): three 3x3 convolutions on a residual path."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(c_in, c_out), nn.ReLU(), conv3x3(c_out, c_out), nn.ReLU(), conv3x3(c_out, c_out)
        )
        self.skip = Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(config: TinyAutoencoderConfig) -> nn.Sequential:
    """Images in [0, 1] [N, 3, H, W] -> latents [N, latent, H / f, W / f]: per stage a convolution (stride
    2 and no bias after the first) and its blocks, then a convolution to the latent channels."""
    layers: list[nn.Module] = []
    for stage, (width, blocks) in enumerate(zip(config.encoder_channels, config.encoder_blocks, strict=True)):
        first = stage == 0
        layers.append(conv3x3(3 if first else width, width, stride=1 if first else 2, bias=first))
        layers += [TinyBlock(width, width) for _ in range(blocks)]
    layers.append(conv3x3(config.encoder_channels[-1], config.latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(config: TinyAutoencoderConfig) -> nn.Sequential:
    """Latents -> images in [0, 1]: soft clamp, a convolution and ReLU, then per stage its blocks, an
    upsampling (all but the last stage) and a bias-free convolution; the last one maps to RGB."""
    widths, stages = config.decoder_channels, len(config.decoder_blocks)
    layers: list[nn.Module] = [SoftClamp(), conv3x3(config.latent_channels, widths[0]), nn.ReLU()]
    for stage, (width, blocks) in enumerate(zip(widths, config.decoder_blocks, strict=True)):
        last = stage == stages - 1
        layers += [TinyBlock(width, width) for _ in range(blocks)]
        if not last:
            layers.append(nn.Upsample(scale_factor=config.upsampling_factor, mode="nearest"))
        layers.append(conv3x3(width, 3 if last else width, bias=last))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """A TAESD pair (the encoder is optional: a decoder file alone decodes) with the latent codec of
    ``models.autoencoder.Autoencoder``: ``to_latent`` and ``from_latent`` on diffusion-space latents."""

    def __init__(self, config: TinyAutoencoderConfig, *, with_encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = tiny_encoder(config) if with_encoder else None
        self.decoder = tiny_decoder(config)

    @property
    def factor(self) -> int:
        return self.config.upsampling_total

    def to_latent(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Diffusion-space latents of images in [-1, 1] (deterministic: ``generator`` and ``sample`` are
        accepted for the autoencoder's signature and unused)."""
        if self.encoder is None:
            raise UserError(
                "this tiny autoencoder has only a decoder; load its taesd_encoder file too (beside the "
                "decoder file, or a diffusers AutoencoderTiny folder) to encode images"
            )
        return self.encoder((images + 1) / 2)

    def from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (nominally) from diffusion-space latents."""
        return self.decoder(latents) * 2 - 1

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.from_latent(latents)
