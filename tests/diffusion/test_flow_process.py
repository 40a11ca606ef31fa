"""The noise-process seam: rectified flow against diffusers' flow schedulers and its own algebra, and the
discrete VP process unchanged from the schedules it wraps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.process import (
    FLOW_SIGMA_MAX,
    DiscreteVP,
    RectifiedFlow,
    process_from_config,
)
from latentdiffusion.diffusion.schedules import NoiseSchedule, initial_noise_scale, sampling_sigmas
from latentdiffusion.samplers import SAMPLERS

FLOW = ScheduleConfig(process="flow", prediction_type="flow", shift=3.0)


def flow_times(sigmas: torch.Tensor) -> torch.Tensor:
    """Flow time t = sigma / (1 + sigma) of VE levels, 1 at the cap."""
    sigmas = sigmas.double()
    return torch.where(sigmas >= FLOW_SIGMA_MAX, torch.ones_like(sigmas), sigmas / (1 + sigmas))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("discretisation", [None, "karras", "exponential"])
def test_euler_levels_are_flow_match_euler_schedulers(shift, steps, discretisation):
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=shift,
        use_karras_sigmas=discretisation == "karras",
        use_exponential_sigmas=discretisation == "exponential",
    )
    scheduler.set_timesteps(steps)
    process = RectifiedFlow(shift, 1000)
    sigmas = process.sampling_sigmas(steps, "euler", discretisation)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    assert sigmas[0] == FLOW_SIGMA_MAX  # t = 1: pure noise, at the cap
    assert torch.allclose(flow_times(sigmas), scheduler.sigmas.double(), rtol=0, atol=2e-8)
    timesteps = process.timestep(sigmas[:-1])
    assert timesteps[0] == 1000.0  # exactly T at the cap, as diffusers' first timestep
    assert torch.allclose(timesteps, scheduler.timesteps, rtol=0, atol=1e-4)
    assert not torch.equal(timesteps, timesteps.round()) or shift == 1.0 or steps == 1  # not rounded


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
@pytest.mark.parametrize("steps", [1, 7, 28])
def test_multistep_levels_are_flow_dpm_solvers(sampler, steps):
    import diffusers

    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    if sampler == "unipc":
        scheduler = diffusers.UniPCMultistepScheduler(**common)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**common)
    scheduler.set_timesteps(steps)
    sigmas = process_from_config(FLOW).sampling_sigmas(steps, sampler)
    assert sigmas[-1] == 0
    # DPM-Solver starts below t = 1; UniPC at 1 - 1e-6, which is above the cap (t = 1 here)
    assert (sigmas[0] == FLOW_SIGMA_MAX) == (sampler == "unipc")
    assert torch.allclose(flow_times(sigmas), scheduler.sigmas.double(), rtol=0, atol=1.1e-6)
    assert torch.allclose(flow_times(sigmas[1:]), scheduler.sigmas[1:].double(), rtol=0, atol=2e-8)


def test_every_sampler_gets_strictly_descending_flow_levels_ending_at_zero():
    process = process_from_config(FLOW)
    for name in SAMPLERS:
        for discretisation in (None, "karras", "exponential"):
            sigmas = process.sampling_sigmas(10, name, discretisation)
            assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0, (name, discretisation)


def test_flow_refuses_discrete_spacings_and_unknown_samplers():
    process = process_from_config(FLOW)
    with pytest.raises(ValueError, match="timestep spacing of discrete"):
        process.sampling_sigmas(10, "euler", "trailing")
    with pytest.raises(ValueError, match="unknown sampler"):
        process.sampling_sigmas(10, "nope")
    with pytest.raises(ValueError, match="unknown noise process"):
        process_from_config(replace(FLOW, process="diffusion"))


def test_predictions_must_fit_the_process():
    network = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown prediction_type 'v_prediction' for the 'flow'"):
        Denoiser(network, process_from_config(FLOW), "v_prediction")
    with pytest.raises(ValueError, match="unknown prediction_type 'flow' for the 'discrete'"):
        Denoiser(network, process_from_config(ScheduleConfig()), "flow")


def test_scale_noise_start_equals_the_ve_start_at_the_network_scale():
    """diffusers' img2img start sigma * noise + (1 - sigma) * x0 (its sigma is our t) is our VE start
    x0 + sigma_ve * noise scaled by c_in."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    process = process_from_config(FLOW)
    sigmas = process.sampling_sigmas(28, "euler")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for start in (1, 7, 20):  # strength 1 - start / 28
        theirs = scheduler.scale_noise(x0, scheduler.timesteps[start : start + 1], noise)
        ours = process.to_unit_scale(x0 + sigmas[start] * noise, sigmas[start])
        assert (ours - theirs).abs().max() < 2e-6


class VelocityOf:
    """A network that returns the true velocity eps - x0 of its input (x_t = (1 - t) x0 + t eps)."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor) -> None:
        self.x0, self.eps, self.timesteps = x0, eps, []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(t)
        return self.eps - self.x0


def test_flow_denoiser_inverts_the_training_noise():
    """D(x, sigma) gives back x0 exactly from the velocity target of the x_t that training builds."""
    process = process_from_config(FLOW)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0.02, 0.5, 0.97])
    x_t = process.add_noise(x0, eps, t)
    assert torch.allclose(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    assert torch.equal(process.training_target("flow", x0, eps, t), eps - x0)
    assert torch.allclose(process.network_timestep(t), t * 1000)
    network = VelocityOf(x0, eps)
    sigma = t / (1 - t)
    x_ve = x_t / (1 - t.view(-1, 1, 1, 1))
    assert torch.allclose(x_ve, x0 + sigma.view(-1, 1, 1, 1) * eps, atol=1e-5)
    estimate = Denoiser(network, process, "flow")(x_ve, sigma)
    assert (estimate - x0).abs().max() < 1e-5
    assert torch.allclose(network.timesteps[0], t * 1000, atol=1e-4)


def test_flow_network_sees_the_starting_noise_and_timestep_1000_at_the_cap():
    process = process_from_config(FLOW)
    sigmas = process.sampling_sigmas(28, "euler")
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    seen = []
    Denoiser(lambda x, t: seen.append((x, t)) or torch.zeros_like(x), process, "flow")(
        noise * process.initial_noise_scale(sigmas, "euler"), sigmas[:1]
    )
    x_in, t = seen[0]
    assert (x_in - noise).abs().max() < 1e-6 and torch.equal(t, torch.full((2,), 1000.0))


def test_logit_normal_training_times():
    """t = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024, Sec. 3.1): median 1/2, quartiles sigmoid(+-0.674)."""
    from latentdiffusion.training.task import StepRandom

    process = process_from_config(FLOW)
    t = torch.cat([process.training_times(StepRandom(0, b, 4096, torch.arange(4096))) for b in range(4)])
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() < 1
    quartiles = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75]))
    expected = torch.sigmoid(torch.tensor([-0.6745, 0.0, 0.6745]))
    assert torch.allclose(quartiles, expected, atol=0.01)
    shifted = torch.cat(
        [process.training_times(StepRandom(0, b, 4096, torch.arange(4096)), 3.0) for b in range(4)]
    )
    assert abs(shifted.median() - 0.75) < 0.01  # the time shift maps the median 1/2 to 3/4


@pytest.mark.parametrize(
    "config",
    [
        ScheduleConfig(),
        replace(ScheduleConfig(), timestep_spacing="trailing", rescale_zero_terminal_snr=True),
    ],
)
def test_discrete_process_is_the_schedule_it_wraps(config):
    process = process_from_config(config)
    schedule = NoiseSchedule.from_config(config)
    assert isinstance(process, DiscreteVP)
    for sampler in ("ddim", "euler", "dpmpp_2m", "lcm"):
        for discretisation in (None, "karras", "linspace"):
            theirs = sampling_sigmas(schedule, config, 12, sampler, discretisation)
            ours = process.sampling_sigmas(12, sampler, discretisation)
            assert torch.equal(ours, theirs)
            spacing = replace(config, timestep_spacing=discretisation or config.timestep_spacing)
            if discretisation == "karras":
                spacing = config
            assert process.initial_noise_scale(ours, sampler, discretisation) == initial_noise_scale(
                ours, spacing, sampler
            )
    sigma = torch.tensor([0.1, 1.0, 14.0])
    assert torch.equal(process.timestep(sigma), schedule.sigma_to_t(sigma).round().float())
    assert torch.allclose(process.to_unit_scale(torch.ones(3), 2.0), torch.full((3,), 5**-0.5))
