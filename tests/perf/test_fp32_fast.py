"""The float32 fast path (``precision="fp32-fast"``): packed oneDNN weights in float32 against the plain
float32 reference on tiny models."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentdiffusion as ld
from latentdiffusion.config import TINY
from latentdiffusion.models.layers import Conv2d, Linear, is_prepacked, set_prepacking
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.precision import apply_precision, precision_of

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


def unet_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, TINY.unet.context_dim, generator=g)
    return x, torch.tensor([981.0, 20.0]), context


def packed_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, Conv2d | Linear) and m._packed_weight is not None]


@torch.inference_mode()
def test_fp32_fast_unet_matches_fp32(make_components) -> None:
    reference, fast = make_components(), apply_precision(make_components(), "fp32-fast")
    expected = reference.unet(*unet_inputs())
    actual = fast.unet(*unet_inputs())
    assert actual.dtype == torch.float32
    # the same float32 arithmetic in another summation order
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    layers = packed_layers(fast.unet)
    assert any(isinstance(m, Conv2d) for m in layers) and any(isinstance(m, Linear) for m in layers)
    assert not packed_layers(reference.unet)


@torch.inference_mode()
def test_fp32_fast_autoencoder_matches_fp32(make_components) -> None:
    reference, fast = make_components(), apply_precision(make_components(), "fp32-fast")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = reference.autoencoder.decode(z)
    actual = fast.autoencoder.decode(z)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    assert packed_layers(fast.autoencoder)


def test_fp32_fast_generation_matches_fp32(make_components, psnr) -> None:
    reference = Pipeline(make_components())
    fast = Pipeline(apply_precision(make_components(), "fp32-fast"))
    settings = {"steps": 4, "seed": 3, "width": 32, "height": 32}
    a = fast.generate("a red circle", **settings)[0]
    b = reference.generate("a red circle", **settings)[0]
    assert psnr(a, b) > 60  # 8-bit images equal but for an occasional 1-level rounding flip


def test_fp32_fast_with_deep_cache_stays_close(make_components, psnr) -> None:
    reference = Pipeline(make_components())
    fast = Pipeline(apply_precision(make_components(), "fp32-fast"))
    settings = {"steps": 6, "seed": 3, "width": 32, "height": 32}
    exact = reference.generate("a red circle", **settings)[0]
    cached = fast.generate("a red circle", cache_interval=2, **settings)[0]
    plain_cached = reference.generate("a red circle", cache_interval=2, **settings)[0]
    assert psnr(cached, plain_cached) > 60  # packing changes nothing that DeepCache does
    assert psnr(cached, exact) > 30


def test_precision_names_and_switching(make_components) -> None:
    components = apply_precision(make_components(), "fp32-fast")
    assert precision_of(components) == "fp32-fast"
    assert components.unet.conv_in.prepack and components.autoencoder.decoder.conv_in.prepack
    assert components.unet.conv_in.weight.dtype == torch.float32
    assert is_prepacked(components.text_encoder)  # float32 on packed weights, as the U-Net
    back = apply_precision(components, "fp32")
    assert precision_of(back) == "fp32" and not is_prepacked(back.unet)
    assert not is_prepacked(back.text_encoder)


@torch.inference_mode()
@pytest.mark.parametrize("precision", ["fp32-fast", "bf16"])
def test_packed_text_encoder_matches_fp32(make_components, precision: str) -> None:
    """The text encoder stays float32 under both fast paths, on packed weights: the same states up to
    summation order."""
    from latentdiffusion.prompts import encode_prompts

    plain = make_components()
    fast = apply_precision(make_components(), precision)
    assert is_prepacked(fast.text_encoder)
    prompts = ["a red circle on a blue background", "two squares"]

    def states(components):
        return encode_prompts(components.tokenizers["text_encoder"], components.text_encoder, prompts, 1)

    torch.testing.assert_close(states(fast), states(plain), atol=1e-5, rtol=1e-5)
    assert precision_of(ld.load("preset:tiny", precision="fp32-fast").components) == "fp32-fast"


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux's /proc/self/pagemap")
def test_fp32_fast_hands_back_the_pages_of_packed_weights(tmp_path, make_components) -> None:
    """The loaded float32 weights stay memory-mapped views; once a layer runs on its packed copy, the file
    pages of its own weight are handed back, and images repeat exactly."""
    from latentdiffusion.pipelines.precision import FilePages

    Pipeline(make_components()).save(tmp_path / "model")
    pipe = ld.load(str(tmp_path / "model"), precision="fp32-fast")
    assert FilePages(pipe.unet).ranges
    weights = [m.weight for m in pipe.unet.modules() if isinstance(m, Conv2d | Linear)]
    for weight in weights:
        weight.sum()  # make every page resident
    present, total = resident_pages(weights)
    assert total > 0 and present == total
    settings = {"steps": 2, "seed": 3, "width": 32, "height": 32}
    first = np.asarray(pipe.generate("a red circle", **settings)[0])
    assert resident_pages(weights)[0] < total / 20
    second = np.asarray(pipe.generate("a red circle", **settings)[0])
    assert np.array_equal(first, second) and first.std() > 0
    unpacked = ld.load(str(tmp_path / "model"), precision="fp32")
    assert not any(m._forward_hooks for m in unpacked.unet.modules() if isinstance(m, Conv2d | Linear))


def resident_pages(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(present, total) over the pages lying wholly inside ``tensors`` (/proc/self/pagemap bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    present = total = 0
    with open("/proc/self/pagemap", "rb") as f:
        for tensor in tensors:
            begin, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
            for number in range(-(-begin // page), end // page):
                f.seek(number * 8)
                present += struct.unpack("<Q", f.read(8))[0] >> 63
                total += 1
    return present, total


@torch.inference_mode()
def test_packed_float32_linear_and_conv_match_plain() -> None:
    torch.manual_seed(0)
    linear, conv = Linear(48, 40), Conv2d(8, 16, 3, stride=2, padding=1)
    tokens, image = torch.randn(2, 11, 48), torch.randn(1, 8, 9, 9)
    set_prepacking(linear, True)
    set_prepacking(conv, True)
    torch.testing.assert_close(linear(tokens), F.linear(tokens, linear.weight, linear.bias))
    torch.testing.assert_close(conv(image), F.conv2d(image, conv.weight, conv.bias, stride=2, padding=1))
    assert linear._packed_weight is not None and conv._packed_weight is not None
    flat = torch.randn(3, 48)  # another row count reuses the packed weight
    torch.testing.assert_close(linear(flat), F.linear(flat, linear.weight, linear.bias))
