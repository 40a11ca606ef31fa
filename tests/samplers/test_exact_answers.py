"""Samplers against closed forms for Gaussian data x0 ~ N(mu, s^2) (independent per dimension).

The ideal denoiser is D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and the probability-flow ODE
is solved by x(sigma) = mu + (x(sigma_max) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2).
Deterministic samplers must converge to it at their order; stochastic ones must sample N(mu, s^2).

Under rectified flow (x_t = (1 - t) x0 + t eps, sigma = t / (1 - t)) the same ODE is integrated through
the flow Denoiser around an exact velocity network; from pure noise (t = 1, sigma infinite) its solution
is x(0) = mu + s * noise.
"""

from __future__ import annotations

import math

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.process import RectifiedFlow
from latentdiffusion.diffusion.schedules import (
    NoiseSchedule,
    sampling_sigmas,
    sigmas_exponential,
    sigmas_karras,
)
from latentdiffusion.samplers import sample

SIGMA_MAX = 20.0
DIMS = 16


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(DIMS, generator=g, dtype=torch.float64)
    s = 0.3 + torch.rand(DIMS, generator=g, dtype=torch.float64)
    return mu, s


def ideal_denoiser(mu, s):
    def denoise(x, sigma):
        sigma = sigma.reshape(-1, 1)
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return denoise


def exact_velocity_network(mu, s):
    """v(x_t, t) = E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps: with a = 1 - t,
    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + t^2) (x_t - a mu) and E[eps | x_t] = (x_t - a E[x0 | x_t]) / t."""

    def network(x_t, timestep):
        t = (timestep.double() / 1000).reshape(-1, 1)
        a = 1 - t
        x0 = mu + a * s**2 / (a**2 * s**2 + t**2) * (x_t - a * mu)
        return (x_t - a * x0) / t - x0

    return network


def denoiser_of(process, mu, s):
    """The exact D(x, sigma): VE's ideal denoiser, or the flow Denoiser around the exact velocity."""
    if process == "vp":
        return ideal_denoiser(mu, s)
    return Denoiser(exact_velocity_network(mu, s), RectifiedFlow(3.0), "flow")


def consistency_function(mu, s):
    """The ODE's map from (x, sigma) to sigma = 0: the ideal denoiser of a consistency model (LCM)."""

    def denoise(x, sigma):
        return mu + (x - mu) * s / torch.sqrt(s**2 + sigma.reshape(-1, 1) ** 2)

    return denoise


def ode_solution(mu, s, x_start, sigma_start, sigma):
    return mu + (x_start - mu) * torch.sqrt(s**2 + sigma**2) / torch.sqrt(s**2 + sigma_start**2)


def final_error(name, mu, s, steps, process="vp", **options):
    sigmas = sigmas_karras(steps + 1, 0.0, SIGMA_MAX)  # rho = 7 ramp that reaches 0 smoothly
    x = SIGMA_MAX * torch.randn(8, DIMS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample(name, denoiser_of(process, mu, s), x, sigmas, **options)
    return (out - ode_solution(mu, s, x, SIGMA_MAX, 0.0)).abs().max().item()


# Expected global order on this non-uniform grid: PLMS's equal-step Adams-Bashforth weights make it
# second order here (it approaches 4 on a uniform grid); LMS still ramps up from its warm-up.
ORDERS = [
    ("euler", {}, 1.0, 0.25),
    ("ddim", {"eta": 0.0}, 1.0, 0.25),
    ("heun", {}, 2.0, 0.4),
    ("plms", {}, 2.0, 0.4),
    ("dpmpp_2m", {}, 2.0, 0.4),
    ("unipc", {}, 3.0, 0.4),
    ("lms", {}, 4.0, 0.6),
]


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize(("name", "options", "order", "slack"), ORDERS)
def test_deterministic_sampler_converges_at_its_order(data, name, options, order, slack, process):
    mu, s = data
    errors = [final_error(name, mu, s, steps, process, **options) for steps in (32, 64, 128)]
    assert errors[-1] < 0.1 * s.max()
    estimate = math.log2(errors[-2] / errors[-1])
    assert abs(estimate - order) < slack, f"{name}: errors {errors}, order {estimate:.2f}"


@pytest.mark.parametrize("name", ["euler", "ddim", "heun", "plms", "lms", "dpmpp_2m", "unipc"])
def test_flow_samplers_from_pure_noise_reach_the_flow_ode_solution(data, name):
    """With the flow model's own levels (t = 1 at the cap for all but DPM-Solver), each sampler lands on
    x(0) = mu + s * noise, with an error that shrinks with the steps (to the cap's ~1 / 4096)."""
    mu, s = data
    process = RectifiedFlow(3.0)
    noise = torch.randn(8, DIMS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for steps in (8, 32, 128):
        sigmas = process.sampling_sigmas(steps, name).double()
        x = noise * process.initial_noise_scale(sigmas, name)
        out = sample(name, denoiser_of("flow", mu, s), x, sigmas)
        errors.append((out - (mu + s * noise)).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors  # 16x the steps: >= 16x less error at first order
    assert errors[2] < errors[0] / 15 and errors[2] < 0.06, errors


def test_plms_ending_at_sigma_min_matches_the_ode_there(data):
    """DDIM/PLMS with set_alpha_to_one=False stop at sigma(t=0) > 0: the result is x(sigma_last)."""
    mu, s = data
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sigmas = sampling_sigmas(schedule, ScheduleConfig(), 100, "plms").double()
    x = float(sigmas[0]) * torch.randn(
        8, DIMS, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    out = sample("plms", ideal_denoiser(mu, s), x, sigmas)
    at_sigma_last = ode_solution(mu, s, x, sigmas[0], sigmas[-1])
    at_zero = ode_solution(mu, s, x, sigmas[0], 0.0)
    assert (at_sigma_last - at_zero).abs().max() > 1.5e-3
    assert (out - at_sigma_last).abs().max() < 5e-4


def standardized_samples(name, denoiser, sigmas, mu, s, **options):
    """64000 standardized values, drawn in chunks of 32000 elements: below torch's parallel grain, so
    the thousands of small steps stay single-threaded (fast on a busy machine)."""
    chunks = []
    for seed in (5, 6):
        g = torch.Generator().manual_seed(seed)
        x = float(sigmas[0]) * torch.randn(2000, DIMS, generator=g, dtype=torch.float64)
        chunks.append((sample(name, denoiser, x, sigmas, generator=g, **options) - mu) / s)
    return torch.cat(chunks)


STOCHASTIC = [
    # Ancestral steps ignore Var[x0 | x], so their variance converges at first order: many steps.
    ("ddpm", {}, 1000),
    ("euler_ancestral", {}, 1000),
    ("ddim", {"eta": 1.0}, 1000),
    ("dpmpp_2m_sde", {}, 100),
]


@pytest.mark.parametrize(("name", "options", "steps"), STOCHASTIC)
def test_stochastic_sampler_samples_the_data_distribution(data, name, options, steps):
    mu, s = data
    sigmas = torch.cat([sigmas_exponential(steps, 0.01, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)])
    z = standardized_samples(name, ideal_denoiser(mu, s), sigmas, mu, s, **options)
    n = z.numel()  # 64000: standard errors 0.004 (mean) and 0.0056 (variance)
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n) + 0.012  # + the discretisation bias


def test_lcm_with_a_consistency_function_samples_exactly(data):
    mu, s = data
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sigmas = sampling_sigmas(schedule, ScheduleConfig(), 4, "lcm").double()
    z = standardized_samples("lcm", consistency_function(mu, s), sigmas, mu, s, schedule=schedule)
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)


def grid_sigmas(schedule, timesteps):
    """Noise levels of whole training timesteps, ending at sigma(t = 0) as TCD's do."""
    levels = schedule.t_to_sigma(torch.tensor([*timesteps, 0], dtype=torch.float64))
    return levels.double()


def test_tcd_with_gamma_zero_is_ddim_on_the_training_grid(data):
    """gamma = 0 puts TCD's intermediate level s on the next level: a DDIM step, exactly."""
    mu, s = data
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sigmas = grid_sigmas(schedule, range(999, 0, -37))
    x = float(sigmas[0]) * torch.randn(
        8, DIMS, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    tcd = sample("tcd", ideal_denoiser(mu, s), x, sigmas, schedule=schedule, eta=0.0)
    ddim = sample("ddim", ideal_denoiser(mu, s), x, sigmas)
    torch.testing.assert_close(tcd, ddim, rtol=0, atol=1e-12)
