"""Bounded memory: attention in query chunks, autoencoder encode/decode in blended tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.models.attention import attention
from latentdiffusion.pipelines.vae_tiling import TiledAutoencoder, with_tiled_autoencoder


@pytest.mark.parametrize("upcast", [False, True])
def test_chunked_attention_equals_sdpa(upcast) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (37, 11, 11))
    expected = F.scaled_dot_product_attention(q, k, v)
    budget = 4 * 2 * 3 * 11 * 5  # five query rows per chunk: 8 chunks, the last one short
    torch.testing.assert_close(
        attention(q, k, v, budget=budget, upcast=upcast), expected, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(attention(q, k, v), expected, atol=1e-6, rtol=1e-6)


def test_reduced_precision_chunks_with_upcast() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g).bfloat16() for _ in range(3))
    actual = attention(q, k, v, upcast=True, budget=4 * 2 * 9 * 2)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=1e-2, rtol=1e-2)


class LocalCodec(nn.Module):
    """A stand-in autoencoder whose decoder is local (nearest x4 upsampling and a 1x1 conv), for which
    tiled decoding must reproduce the whole decode exactly: any misplaced tile or badly normalised
    blending weight would show."""

    class Config:
        downsampling_factor = 4
        scaling_factor = 0.5
        shift_factor = 0.0

    config = Config()

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.project = nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.project(F.interpolate(z, scale_factor=4, mode="nearest"))


@torch.inference_mode()
def test_tiles_are_placed_and_blended_exactly() -> None:
    codec = LocalCodec()
    z = torch.randn(2, 4, 37, 29)
    tiled = TiledAutoencoder(codec, tile=12, overlap=4)
    torch.testing.assert_close(tiled.decode(z), codec.decode(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled.from_latent(z), codec.decode(z / 0.5), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_tiled_decode_is_close_and_seamless(make_components) -> None:
    vae = make_components().autoencoder  # factor 2: a 48x48 latent is a 96x96 image, 4x4 tiles of 16
    g = torch.Generator().manual_seed(0)
    z = F.interpolate(torch.randn(1, 4, 6, 6, generator=g), size=(48, 48), mode="bilinear")
    whole = vae.decode(z)
    tiled = TiledAutoencoder(vae, tile=16, overlap=8).decode(z)
    assert tiled.shape == whole.shape
    # Tiles see only their own context (GroupNorm statistics, the mid-block attention), so a random
    # decoder differs from the whole decode; the blend keeps the difference moderate...
    assert (tiled - whole).abs().mean() < 0.8 * whole.std()
    # ...and leaves no seam: no column-to-column jump is much larger than the whole decode's largest.
    jumps = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    whole_jumps = (whole[..., 1:] - whole[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert jumps.max() < 1.5 * whole_jumps.max()


@torch.inference_mode()
def test_small_inputs_are_not_tiled_and_encode_tiles(make_components) -> None:
    components = make_components()
    vae = components.autoencoder
    tiled = with_tiled_autoencoder(components, tile=16, overlap=8).autoencoder
    assert with_tiled_autoencoder(with_tiled_autoencoder(components)).autoencoder.autoencoder is vae  # once
    small = torch.rand(1, 3, 32, 32) * 2 - 1  # 16 latents per side: one tile
    assert torch.equal(tiled.to_latent(small), vae.to_latent(small))
    large = F.interpolate(torch.rand(1, 3, 4, 4) * 2 - 1, size=(96, 64), mode="bilinear")
    moments = tiled.encode(large)
    assert moments.mean.shape == vae.encode(large).mean.shape == (1, 4, 48, 32)
    assert (moments.mean - vae.encode(large).mean).abs().mean() < vae.encode(large).mean.std()
