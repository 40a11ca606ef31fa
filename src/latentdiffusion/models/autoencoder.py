"""The KL-regularised first-stage autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1, App. G).

An encoder E maps an image x in [-1, 1] to the parameters of a diagonal Gaussian q(z | x) over latents
(a VAE posterior, Kingma & Welling 2014, Sec. 2.4 and App. B); a decoder D maps z back to pixels.
Latent diffusion runs on ``scale * (z - shift)`` so that the latents have roughly unit variance
(Sec. 4.3.2 of Rombach et al. 2022: the "rescaled" latent space).

Module names (state-dict keys):
  encoder.{conv_in, down_blocks.{i}.resnets.{j}, down_blocks.{i}.downsample.conv,
           mid_block.resnets.{0,1}, mid_block.attention.{norm, attn.to_q/to_k/to_v/to_out},
           norm_out, conv_out},
  quant_conv, post_quant_conv,
  decoder.{conv_in, mid_block..., up_blocks.{i}.resnets.{j}, up_blocks.{i}.upsample.conv, norm_out,
           conv_out}.
``up_blocks.{i}`` runs in execution order, so ``decoder.up_blocks.0`` is the deepest level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.config import AutoencoderConfig
from latentdiffusion.models.attention import SpatialSelfAttention
from latentdiffusion.models.layers import Conv2d, Downsample, ResBlock, Upsample

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # keeps exp(logvar) finite in float32


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) from the encoder's [N, 2C, h, w] moments."""

    def __init__(self, moments: torch.Tensor) -> None:
        mean, logvar = moments.chunk(2, dim=1)  # [N, C, h, w] each
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014,
        Sec. 2.4). The noise is drawn on the generator's device, so a CPU generator gives the same
        latents on any device."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) per sample, [N] (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _resblock(config: AutoencoderConfig, in_channels: int, out_channels: int) -> ResBlock:
    return ResBlock(in_channels, out_channels, groups=config.norm_groups, eps=config.norm_eps)


class MidBlock(nn.Module):
    """ResBlock, single-head self-attention, ResBlock at the lowest resolution."""

    def __init__(self, config: AutoencoderConfig, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(_resblock(config, channels, channels) for _ in range(2))
        self.attention = SpatialSelfAttention(channels, groups=config.norm_groups, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C, h, w] -> [N, C, h, w]
        return self.resnets[1](self.attention(self.resnets[0](x)))


class EncoderLevel(nn.Module):
    """num_res_blocks ResBlocks, then (except on the last level) an asymmetric-pad downsample."""

    def __init__(self, config: AutoencoderConfig, level: int, in_channels: int, *, last: bool) -> None:
        super().__init__()
        channels = config.block_channels[level]
        inputs = [in_channels] + [channels] * (config.num_res_blocks - 1)
        self.resnets = nn.ModuleList(_resblock(config, c, channels) for c in inputs)
        self.downsample = None if last else Downsample(channels, asymmetric_pad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C_in, H, W] -> [N, C, H/2, W/2] (or [N, C, H, W] on the last level)
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """num_res_blocks + 1 ResBlocks, then (except on the full-resolution level) an x2 upsample."""

    def __init__(self, config: AutoencoderConfig, level: int, in_channels: int, *, last: bool) -> None:
        super().__init__()
        channels = config.block_channels[level]
        inputs = [in_channels] + [channels] * config.num_res_blocks
        self.resnets = nn.ModuleList(_resblock(config, c, channels) for c in inputs)
        self.upsample = None if last else Upsample(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, C_in, h, w] -> [N, C, 2h, 2w] (or [N, C, h, w] on the last level)
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """E: image [N, in_channels, H, W] -> Gaussian moments [N, 2 * latent_channels, H/f, W/f]."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths, levels = config.block_channels, len(config.block_channels)
        self.conv_in = Conv2d(config.in_channels, widths[0], 3, padding=1)
        inputs = [widths[0], *widths[:-1]]
        self.down_blocks = nn.ModuleList(
            EncoderLevel(config, i, inputs[i], last=i == levels - 1) for i in range(levels)
        )
        self.mid_block = MidBlock(config, widths[-1])
        self.norm_out = nn.GroupNorm(config.norm_groups, widths[-1], eps=config.norm_eps)
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down_blocks:
            h = down(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """D: latents [N, latent_channels, h, w] -> image [N, out_channels, h*f, w*f]."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths, levels = config.block_channels, len(config.block_channels)
        self.conv_in = Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid_block = MidBlock(config, widths[-1])
        order = list(reversed(range(levels)))  # deepest level first
        inputs = [widths[-1]] + [widths[level] for level in order[:-1]]
        self.up_blocks = nn.ModuleList(
            DecoderLevel(config, level, c, last=level == 0) for level, c in zip(order, inputs, strict=True)
        )
        self.norm_out = nn.GroupNorm(config.norm_groups, widths[0], eps=config.norm_eps)
        self.conv_out = Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for up in self.up_blocks:
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """The first stage: ``encode(images) -> DiagonalGaussian``, ``decode(z) -> images``, and the
    scaled latent codec ``to_latent`` / ``from_latent`` that the diffusion model sees."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        # SD3's autoencoder has no 1x1 convolutions around the latent
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = Conv2d(latent, latent, 1) if config.use_quant_conv else nn.Identity()
        self.decoder = Decoder(config)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) for images [N, C, H, W] in [-1, 1]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] (nominally in [-1, 1]) from unscaled latents z [N, latent, h, w]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, for training the first stage."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def to_latent(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Diffusion-space latents (z - shift) * scale, z the posterior mode (or a sample)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from diffusion-space latents: decode(latents / scale + shift)."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)


class PointMass(DiagonalGaussian):
    """q(z | x) = delta(z - x): the posterior of the identity first stage (zero variance, no noise drawn)."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean
        self.std = torch.zeros_like(mean)
        self.var = self.std
        self.logvar = torch.full_like(mean, float("-inf"))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


class IdentityAutoencoder(nn.Module):
    """The first stage of pixel-space diffusion (f = 1, Rombach et al. 2022, Sec. 4.1): encode and decode
    are the identity, so the diffusion model works on images in [-1, 1] (times ``scaling_factor``).

    It has no weights; one scalar parameter only carries the module's dtype and device, which the
    pipelines read from the autoencoder's parameters as for a real one.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if not config.in_channels == config.latent_channels == config.out_channels:
            raise ValueError(
                "an identity autoencoder needs in_channels == latent_channels == out_channels, got "
                f"{config.in_channels}, {config.latent_channels}, {config.out_channels}"
            )
        self.config = config
        self.dtype_reference = nn.Parameter(torch.zeros(()), requires_grad=False)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return PointMass(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    # The codec and training forward are the autoencoder's own, over the identity encode / decode.
    forward = Autoencoder.forward
    to_latent = Autoencoder.to_latent
    from_latent = Autoencoder.from_latent


def build_autoencoder(config: AutoencoderConfig) -> Autoencoder | IdentityAutoencoder:
    """The first stage ``config`` describes: the KL autoencoder, or the identity for pixel space."""
    return IdentityAutoencoder(config) if config.identity else Autoencoder(config)
