"""Overlapping tiles with feathered blending, and the autoencoder that encodes/decodes in them, so that
large images need bounded memory.

``blend_tiles`` evaluates a function on overlapping tiles and blends the outputs with weights that ramp
linearly across the overlap (the tapered weights of Jimenez 2023, "Mixture of Diffusers", averaged as in
MultiDiffusion, Bar-Tal et al. 2023, Eq. 5), so there are no seams; the upscaler's tiled denoiser
(``pipelines.upscale.TiledDenoiser``) and ``TiledAutoencoder`` share it.

The decoder's activations grow with the image (a 2048x2048 decode holds 2048 x 2048 x 128 values per
feature map), so above ``tile`` latents per side the latent is cut into tiles that overlap by
``overlap`` latents, each decoded alone and blended. Encoding does the same on image tiles, blending the
posterior moments in latent space. Images up to ``tile`` latents per side go through whole, exactly as
without tiling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.models.autoencoder import Autoencoder, DiagonalGaussian, IdentityAutoencoder
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder

TILE = 64  # latents: 512 pixels for SD's factor-8 autoencoder
OVERLAP = 16  # latents: 128 pixels of blending


# ---------------------------------------------------------------------------------------------------
# Tiles and blending
# ---------------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` shared; the
    last tile ends at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Tile weights along one axis: rising linearly over ``overlap`` at each end, never 0."""
    i = torch.arange(length, dtype=torch.float32, device=device)
    edge = torch.minimum(i + 1, length - i) / (overlap + 1)
    return edge.clamp(max=1.0)


def blend_tiles(
    run: Callable[[int, int, int, int], torch.Tensor],
    size: tuple[int, int],
    tile: int,
    overlap: int,
    scale: int,
) -> torch.Tensor:
    """Evaluate ``run(top, left, height, width)`` on overlapping tiles of an input of ``size`` and
    blend the outputs (``scale`` times the tile's size) with feathered weights."""
    height, width = size
    out = total = None
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            h, w = min(tile, height), min(tile, width)
            y = run(top, left, h, w).float()  # [N, C, h * scale, w * scale]
            o = overlap * scale
            weight = ramp(h * scale, o, y.device)[:, None] * ramp(w * scale, o, y.device)
            if out is None:
                out = y.new_zeros(*y.shape[:2], height * scale, width * scale)
                total = y.new_zeros(height * scale, width * scale)
            rows, cols = slice(top * scale, (top + h) * scale), slice(left * scale, (left + w) * scale)
            out[..., rows, cols] += y * weight
            total[rows, cols] += weight
    return out / total


class TiledAutoencoder(nn.Module):
    """``autoencoder`` whose ``encode`` / ``decode`` (and so ``to_latent`` / ``from_latent``) run in
    blended tiles of ``tile`` latents overlapping by ``overlap`` when the input is larger than a tile."""

    def __init__(self, autoencoder: Autoencoder, tile: int = TILE, overlap: int = OVERLAP) -> None:
        super().__init__()
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got tile {tile}, overlap {overlap}")
        self.autoencoder = autoencoder
        self.tile = tile
        self.overlap = overlap

    @property
    def config(self):
        return self.autoencoder.config

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [N, C, h*f, w*f] from unscaled latents [N, latent, h, w]."""
        decode = self.autoencoder.decode
        if max(z.shape[-2:]) <= self.tile:
            return decode(z)

        def run(top: int, left: int, h: int, w: int) -> torch.Tensor:
            return decode(z[..., top : top + h, left : left + w])

        f = self.config.downsampling_factor
        return blend_tiles(run, tuple(z.shape[-2:]), self.tile, self.overlap, f).to(z.dtype)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) for images [N, C, H, W], H and W multiples of the downsampling factor."""
        f = self.config.downsampling_factor
        size = (images.shape[-2] // f, images.shape[-1] // f)
        if max(size) <= self.tile:
            return self.autoencoder.encode(images)
        ae = self.autoencoder

        def run(top: int, left: int, h: int, w: int) -> torch.Tensor:
            crop = images[..., top * f : (top + h) * f, left * f : (left + w) * f]
            return ae.quant_conv(ae.encoder(crop))  # the posterior's moments, blended below

        moments = blend_tiles(run, size, self.tile, self.overlap, 1).to(images.dtype)
        return DiagonalGaussian(moments)

    # The latent codec is the autoencoder's own; called with this wrapper as ``self`` it reaches the
    # tiled encode / decode above.
    to_latent = Autoencoder.to_latent
    from_latent = Autoencoder.from_latent


def with_tiled_autoencoder(components: Components, tile: int = TILE, overlap: int = OVERLAP) -> Components:
    """A copy of ``components`` whose autoencoder encodes and decodes large images in tiles."""
    if isinstance(components.autoencoder, TiledAutoencoder | IdentityAutoencoder | TinyAutoencoder):
        return components  # already tiled, or pixel space (no memory), or a TAESD (little memory)
    return components.with_modules(autoencoder=TiledAutoencoder(components.autoencoder, tile, overlap))
