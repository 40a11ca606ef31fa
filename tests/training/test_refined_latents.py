"""Decoder-refined cached latents (``data.refine_latents``): the refined latents decode closer to their
images than the encoder's, no step keeps the encoder's exactly, the autoencoder is untouched, the cache
holds the refined means, and the option needs the cache."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.training.config import apply_overrides, validate
from latentdiffusion.training.diffusion import refine_latents
from latentdiffusion.training.loop import train
from latentdiffusion.training.presets import get_train_preset

NO_SAMPLES = {"sample.every": 0, "eval_every": 0, "checkpoint_every": 0}


def tiny(**overrides):
    return apply_overrides(get_train_preset("tiny"), NO_SAMPLES | overrides)


def decoded_error(autoencoder, z: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((autoencoder.decode(z) - x).pow(2).mean())


def test_refined_latents_decode_closer_and_leave_the_autoencoder_alone(shapes_batch):
    autoencoder = build_components(tiny().model, seed=0).autoencoder.eval()
    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    x = shapes_batch(3).x
    with torch.no_grad():
        mean = autoencoder.encode(x).mean
    assert refine_latents(autoencoder, mean, x, 0) is mean
    refined = refine_latents(autoencoder, mean, x, 20)
    assert refined.shape == mean.shape and not torch.equal(refined, mean)
    assert decoded_error(autoencoder, refined, x) < 0.9 * decoded_error(autoencoder, mean, x)
    assert all(torch.equal(v, before[k]) for k, v in autoencoder.state_dict().items())
    assert all(p.grad is None for p in autoencoder.parameters())


def test_the_cache_holds_the_refined_means(tmp_path):
    overrides = {"max_steps": 1, "data.cache_latents": True, "data.size": 4, "batch_size": 2}
    plain = train(tiny(**overrides), tmp_path / "plain")
    refined = train(tiny(**overrides, **{"data.refine_latents": 10}), tmp_path / "refined")
    assert plain.step == refined.step == 1
    caches = [
        torch.load(p / "latents.pt", weights_only=True) for p in (tmp_path / "plain", tmp_path / "refined")
    ]
    means = [c["moments"].float().chunk(2, dim=1) for c in caches]
    assert not torch.equal(means[0][0], means[1][0])  # refined means
    assert torch.equal(means[0][1], means[1][1])  # the same posterior spreads
    assert caches[0]["captions"] == caches[1]["captions"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.refine_latents": 5}, "set data.cache_latents=true too"),
        ({"data.refine_latents": -1, "data.cache_latents": True, "data.size": 4}, "must be >= 0"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(tiny(**overrides))
