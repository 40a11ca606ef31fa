"""DeepCache: interval 1 is the plain U-Net exactly, longer intervals stay close and skip the deep levels."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.errors import UserError
from latentdiffusion.models.unet import FeatureCache
from latentdiffusion.pipelines.deepcache import DeepCacheUNet
from latentdiffusion.pipelines.pipeline import Pipeline


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([700.0, 700.0]),
        torch.randn(2, 5, 32, generator=g),
    )


@torch.inference_mode()
@pytest.mark.parametrize("branch", [0, 1, 2])
def test_interval_one_is_the_plain_unet_exactly(make_components, branch) -> None:
    unet = make_components().unet
    cached = DeepCacheUNet(unet, interval=1, branch=branch)
    for seed in range(3):
        assert torch.equal(cached(*inputs(seed)), unet(*inputs(seed)))
    assert cached.full_calls == 3


@torch.inference_mode()
@pytest.mark.parametrize("branch", [0, 2])
def test_shallow_call_reuses_the_deep_features(make_components, branch) -> None:
    """With the same input, the features a shallow call reuses are exactly the ones it would compute."""
    unet = make_components().unet
    cache = FeatureCache(branch=branch)
    full = unet(*inputs(0), cache=cache)
    cache.reuse = True
    torch.testing.assert_close(unet(*inputs(0), cache=cache), full, atol=1e-6, rtol=1e-6)


@torch.inference_mode()
def test_interval_counts_full_calls(make_components) -> None:
    cached = DeepCacheUNet(make_components().unet, interval=3)
    for _ in range(7):
        cached(*inputs(0))
    assert cached.full_calls == 3  # calls 1, 4 and 7
    x, t, context = inputs(0)
    cached(x[:1], t[:1], context[:1])  # another batch size: the stored features do not fit
    assert cached.full_calls == 4


def test_generation_interval_one_is_exact_and_three_is_close(make_components, psnr) -> None:
    pipe = Pipeline(make_components())
    settings = {"steps": 9, "seed": 5, "width": 32, "height": 32}
    plain = pipe.generate("a blue square", **settings)[0]
    assert pipe.generate("a blue square", cache_interval=1, **settings)[0].tobytes() == plain.tobytes()
    cached = pipe.generate("a blue square", cache_interval=3, **settings)[0]
    assert cached.tobytes() != plain.tobytes()
    assert psnr(cached, plain) > 35  # measured 42 dB on this model
    assert "DeepCache: 3" in cached.info["parameters"]


def test_bad_interval_is_a_user_error(tiny_pipeline) -> None:
    with pytest.raises(UserError, match="cache_interval"):
        tiny_pipeline.generate("x", steps=1, width=32, height=32, cache_interval=0)
