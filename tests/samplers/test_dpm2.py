"""DPM-Solver-2 (``dpm_2``) and its ancestral variant: exact answers on Gaussian data and parity with
diffusers' KDPM2DiscreteScheduler / KDPM2AncestralDiscreteScheduler (the same algorithm: an Euler step to
the log-sigma midpoint, the full step with the midpoint's derivative)."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.schedules import NoiseSchedule, sampling_sigmas, sigmas_exponential
from latentdiffusion.samplers import sample

from .test_diffusers_parity import SD, ToyEpsNetwork, run_diffusers
from .test_exact_answers import final_error, ideal_denoiser, standardized_samples


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(16, generator=g, dtype=torch.float64)
    s = 0.3 + torch.rand(16, generator=g, dtype=torch.float64)
    return mu, s


def test_dpm_2_converges_at_second_order(data):
    mu, s = data
    errors = [final_error("dpm_2", mu, s, steps) for steps in (32, 64, 128)]
    assert errors[-1] < 0.1 * s.max()
    estimate = math.log2(errors[-2] / errors[-1])
    assert abs(estimate - 2.0) < 0.4, f"errors {errors}, order {estimate:.2f}"


def test_dpm_2_midpoint_is_the_geometric_mean():
    """One step with a denoiser that records its levels: sigma, then sqrt(sigma * sigma_next)."""
    seen = []

    def denoiser(x, sigma):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)

    sample("dpm_2", denoiser, torch.ones(1, 2, dtype=torch.float64), torch.tensor([4.0, 1.0, 0.0]))
    assert seen == pytest.approx([4.0, 2.0, 1.0])


def test_dpm_2_ancestral_samples_the_data_distribution(data):
    mu, s = data
    steps = 500
    sigmas = torch.cat([sigmas_exponential(steps, 0.01, 20.0), torch.zeros(1, dtype=torch.float64)])
    z = standardized_samples("dpm_2_ancestral", ideal_denoiser(mu, s), sigmas, mu, s)
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n) + 0.012


@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_ancestral"])
@pytest.mark.parametrize("steps", [4, 9])
def test_matches_diffusers_kdpm2(name, steps):
    import diffusers

    config = ScheduleConfig(timestep_spacing="linspace", steps_offset=0)
    make = {
        "dpm_2": diffusers.KDPM2DiscreteScheduler,
        "dpm_2_ancestral": diffusers.KDPM2AncestralDiscreteScheduler,
    }
    scheduler = make[name](beta_start=SD.beta_start, beta_end=SD.beta_end, beta_schedule=SD.beta_schedule)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = run_diffusers(scheduler, ToyEpsNetwork(), noise, steps, seed=3 if name != "dpm_2" else None)
    schedule = NoiseSchedule.from_config(config)
    sigmas = sampling_sigmas(schedule, config, steps, name)
    # the level list is diffusers' (every other entry of its interleaved sigmas)
    assert torch.allclose(
        sigmas, torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2]]), rtol=1e-5, atol=1e-7
    )
    denoiser = Denoiser(ToyEpsNetwork(), schedule, "epsilon", round_timesteps=False)
    generator = [torch.Generator().manual_seed(3)]
    ours = sample(name, denoiser, noise * sigmas[0], sigmas, generator=generator)
    assert (ours - theirs).abs().max() < 5e-5
