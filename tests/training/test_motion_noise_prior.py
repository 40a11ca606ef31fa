"""The mixed noise prior for motion modules (``--noise-correlation ALPHA``, Ge et al. 2023): frames stay
standard normal and correlate by alpha^2 / (1 + alpha^2), training draws it and resumes exactly, the module
file records alpha, and clips start from the same prior drawn from their seeds."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import (
    NOISE_KEY,
    load_motion_modules,
    save_motion_modules,
    to_original,
)
from latentdiffusion.checkpoints.safe_io import read_metadata, save_safetensors
from latentdiffusion.diffusion.noise import seeded_generators, seeded_noise
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import MotionConfig, MotionModules, mixed_noise
from latentdiffusion.pipelines.animate import clip_noise
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.motion import EXPORT_FILE, MotionOptions, MotionTask
from latentdiffusion.training.task import StepRandom

from .test_motion_training import base, clip_batch, config_for, straight_and_resumed  # noqa: F401

CORRELATED = MotionOptions(frames=4, noise_correlation=2.0)


def frame_correlation(noise: torch.Tensor) -> float:
    """Correlation of frame 0 and frame 1 of [F, ...] noise, over its entries."""
    a, b = noise[0].flatten(), noise[1].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_frames_stay_standard_normal_and_correlate_as_stated(alpha):
    generator = torch.Generator().manual_seed(0)
    frames, shared = (
        torch.randn(3, 200_000, generator=generator),
        torch.randn(1, 200_000, generator=generator),
    )
    noise = mixed_noise(frames, shared, alpha)
    assert torch.allclose(noise.std(dim=1), torch.ones(3), atol=0.01)
    assert frame_correlation(noise) == pytest.approx(alpha**2 / (1 + alpha**2), abs=0.01)
    assert torch.equal(mixed_noise(frames, shared, 0.0), frames)


def test_clip_noise_follows_the_modules_prior():
    shape, seeds = (2, 4, 5, 6, 6), [3, 9]

    class Seeded:
        latents = None

        def noise(self, shape, device, generators=None):
            from latentdiffusion.diffusion.noise import randn

            if generators is None:
                return seeded_noise(shape, seeds)
            return randn(shape, list(generators), device, torch.float32)

        @property
        def seeds(self):
            return seeds

    request = Seeded()
    assert torch.equal(clip_noise(request, shape, 0.0, torch.device("cpu")), seeded_noise(shape, seeds))
    generators = seeded_generators(seeds)
    frames = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
    shared = torch.cat([torch.randn((1, 4, 1, 6, 6), generator=g) for g in generators])
    expected = mixed_noise(frames, shared, 1.5)
    assert torch.equal(clip_noise(request, shape, 1.5, torch.device("cpu")), expected)


def test_the_file_records_alpha_and_a_bad_one_is_refused(tmp_path):
    config = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, noise_correlation=1.5)
    path = save_motion_modules(MotionModules(config), tmp_path / "mm.safetensors")
    assert read_metadata(path)[NOISE_KEY] == "1.5"
    assert load_motion_modules(path).config == config
    state = to_original(MotionModules(config).state_dict())
    save_safetensors(state, tmp_path / "bad.safetensors", {NOISE_KEY: "-1"})
    with pytest.raises(UserError, match="noise_correlation must be a number >= 0"):
        load_motion_modules(tmp_path / "bad.safetensors")


def test_training_draws_correlated_frames_and_resumes_exactly(base, tmp_path, interrupt_after):  # noqa: F811
    seen = []
    for options in (MotionOptions(frames=4), CORRELATED):
        task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), options)
        add_noise = task.process.add_noise
        task.process.add_noise = lambda z0, eps, t, add=add_noise: seen.append(eps) or add(z0, eps, t)
        task.clip_loss(task.networks, clip_batch(), StepRandom(0, 0, 1, torch.arange(1)))
    independent, correlated = (frame_correlation(eps) for eps in seen)
    assert abs(independent) < 0.3 and correlated > 0.6  # alpha 2: 0.8
    config = config_for(base, max_steps="2")
    straight, resumed = straight_and_resumed(config, tmp_path, CORRELATED, interrupt_after)
    a = load_motion_modules(straight.export_dir / EXPORT_FILE)
    b = load_motion_modules(resumed.export_dir / EXPORT_FILE)
    assert a.config.noise_correlation == 2.0 == b.config.noise_correlation
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not math.isnan(float(a.state_dict()["down_blocks.0.0.proj_out.weight"].sum()))


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf")])
def test_a_bad_alpha_is_refused(alpha):
    with pytest.raises(UserError, match="--noise-correlation must be a number >= 0"):
        MotionOptions(noise_correlation=alpha).validate()


def test_a_clip_starts_from_its_modules_prior(tmp_path):
    import latentdiffusion as ld

    pipe = ld.load("preset:tiny")
    options = dict(width=32, height=32, steps=2, seed=4, frames=4)
    clips = []
    for alpha in (0.0, 3.0, 3.0):
        config = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, noise_correlation=alpha)
        path = save_motion_modules(MotionModules(config), tmp_path / f"mm{alpha}.safetensors")
        clips.append([frame.tobytes() for frame in pipe.animate("a square", motion_module=path, **options)])
    assert clips[1] == clips[2] and clips[1] != clips[0]
