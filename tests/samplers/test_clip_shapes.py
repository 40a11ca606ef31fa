"""Every sampler is shape-agnostic: a clip's latents [B, C, F, H, W] sample exactly as the same numbers laid
out as images [B, C * F, H, W] (AnimateDiff runs the image samplers on clips)."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.noise import seeded_generators
from latentdiffusion.diffusion.schedules import NoiseSchedule, sampling_sigmas
from latentdiffusion.samplers import SAMPLERS, sample


def ideal_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for unit Gaussian data: x / (1 + sigma^2), sigma per sample."""
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_clip_latents_sample_as_the_same_numbers_in_image_shape(name):
    config = ScheduleConfig()
    schedule = NoiseSchedule.from_config(config)
    sigmas = sampling_sigmas(schedule, config, 4, name)
    options = {"schedule": schedule} if name == "tcd" else {}  # TCD steps on the training schedule
    clip = torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    as_clip = sample(name, ideal_denoiser, clip, sigmas, generator=seeded_generators([1, 2]), **options)
    as_images = sample(
        name, ideal_denoiser, clip.flatten(1, 2), sigmas, generator=seeded_generators([1, 2]), **options
    )
    assert as_clip.shape == clip.shape
    assert torch.allclose(as_clip.flatten(1, 2), as_images, atol=1e-6)
