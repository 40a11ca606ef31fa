"""A tiny autoencoder (TAESD) in the autoencoder role takes the same fast paths as the model's own: under
fp32-fast and bf16 its convolutions run on packed oneDNN weights, within those paths' tolerances of fp32."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.models.layers import Conv2d
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig
from latentdiffusion.pipelines.precision import apply_precision

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


def with_tiny_autoencoder(make_components, precision: str):
    torch.manual_seed(0)
    tiny = TinyAutoencoder(TinyAutoencoderConfig()).eval()
    return apply_precision(make_components().with_modules(autoencoder=tiny), precision)


def packed_convolutions(module: torch.nn.Module) -> int:
    return sum(isinstance(m, Conv2d) and m._packed_weight is not None for m in module.modules())


def decode_and_encode(tiny: TinyAutoencoder) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = next(tiny.parameters()).dtype
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=generator)
    images = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    return tiny.from_latent(z.to(dtype)).float(), tiny.to_latent(images.to(dtype)).float()


@torch.inference_mode()
def test_fp32_fast_tiny_autoencoder_is_packed_and_matches_fp32(make_components) -> None:
    reference = with_tiny_autoencoder(make_components, "fp32").autoencoder
    fast = with_tiny_autoencoder(make_components, "fp32-fast").autoencoder
    for actual, expected in zip(decode_and_encode(fast), decode_and_encode(reference), strict=True):
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)  # as test_fp32_fast.py
    convolutions = sum(isinstance(m, Conv2d) for m in fast.modules())
    assert packed_convolutions(fast) == convolutions > 0
    assert packed_convolutions(reference) == 0


@torch.inference_mode()
def test_bf16_tiny_autoencoder_is_packed_and_close_to_fp32(make_components) -> None:
    reference = with_tiny_autoencoder(make_components, "fp32").autoencoder
    fast = with_tiny_autoencoder(make_components, "bf16").autoencoder
    assert next(fast.parameters()).dtype == torch.bfloat16
    (image, latents), (expected_image, expected_latents) = (
        decode_and_encode(fast),
        decode_and_encode(reference),
    )
    # images in [-1, 1]: above the 40 dB of test_precision.py's bf16 images against fp32
    mse = ((image - expected_image) ** 2).mean()
    assert 10 * torch.log10(4 / mse) > 40
    # latents: the bf16 U-Net's bounds in test_precision.py (mean 3%, worst 15% of the output's spread)
    error = (latents - expected_latents).abs()
    assert error.mean() < 0.03 * expected_latents.std()
    assert error.max() < 0.15 * expected_latents.std()
    assert packed_convolutions(fast) == sum(isinstance(m, Conv2d) for m in fast.modules()) > 0
