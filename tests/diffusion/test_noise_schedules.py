"""Schedules and sigma lists against diffusers' schedulers (test-only oracle) and known values."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.schedules import (
    NoiseSchedule,
    initial_noise_scale,
    sampling_sigmas,
    spaced_timesteps,
    to_unit_scale,
)

SD = ScheduleConfig()


def scheduler(name: str, config: ScheduleConfig, discretisation: str | None = None):
    import diffusers

    common = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="squaredcos_cap_v2" if config.beta_schedule == "cosine" else config.beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        steps_offset=config.steps_offset,
    )
    zsnr = {"rescale_betas_zero_snr": config.rescale_zero_terminal_snr}
    ramps = {
        "use_karras_sigmas": discretisation == "karras",
        "use_exponential_sigmas": discretisation == "exponential",
    }
    classes = {
        "ddim": (diffusers.DDIMScheduler, {**zsnr, "set_alpha_to_one": config.set_alpha_to_one}),
        "plms": (
            diffusers.PNDMScheduler,
            {"set_alpha_to_one": config.set_alpha_to_one, "skip_prk_steps": True},
        ),
        "ddpm": (diffusers.DDPMScheduler, zsnr),
        "euler": (diffusers.EulerDiscreteScheduler, {**zsnr, **ramps}),
        "heun": (diffusers.HeunDiscreteScheduler, ramps),
        "lms": (diffusers.LMSDiscreteScheduler, ramps),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {**zsnr, **ramps}),
        "unipc": (diffusers.UniPCMultistepScheduler, {**zsnr, **ramps}),
        "lcm": (diffusers.LCMScheduler, zsnr),
    }
    cls, extra = classes[name]
    return cls(**common, **extra)


def vp_sigma(alphas_cumprod) -> torch.Tensor:
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def diffusers_sigmas(name: str, config: ScheduleConfig, steps: int, discretisation=None) -> torch.Tensor:
    """The noise levels the diffusers scheduler visits, final level included."""
    s = scheduler(name, config, discretisation)
    s.set_timesteps(steps)
    if name in ("euler", "lms", "dpmpp_2m", "unipc"):
        return s.sigmas.double()
    if name == "heun":  # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]
        return torch.cat([s.sigmas[:1], s.sigmas[1::2]]).double()
    timesteps = np.sort(s._timesteps)[::-1].copy() if name == "plms" else s.timesteps.numpy()
    alphas_cumprod = s.alphas_cumprod.double()
    final = vp_sigma(s.final_alpha_cumprod) if name in ("ddim", "plms") else torch.tensor(0.0)
    return torch.cat([vp_sigma(alphas_cumprod[torch.from_numpy(timesteps.astype(np.int64))]), final.view(1)])


def test_stable_diffusion_sigma_range():
    schedule = NoiseSchedule.from_config(SD)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert torch.all(schedule.sigmas[1:] > schedule.sigmas[:-1])


@pytest.mark.parametrize(
    "config",
    [
        SD,
        replace(SD, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        replace(SD, beta_schedule="cosine"),
        replace(SD, rescale_zero_terminal_snr=True),
    ],
    ids=["scaled_linear", "linear", "cosine", "zero_snr"],
)
def test_alphas_cumprod_match_diffusers(config):
    ours = NoiseSchedule.from_config(config).alphas_cumprod
    theirs = scheduler("ddim", config).alphas_cumprod.double()
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)


def test_zero_terminal_snr_ends_in_pure_noise_with_a_finite_sigma():
    config = replace(SD, rescale_zero_terminal_snr=True)
    schedule = NoiseSchedule.from_config(config)
    assert schedule.alphas_cumprod[-1] == 0
    assert schedule.sigma_max == pytest.approx(4096, rel=1e-3)
    euler = scheduler("euler", config)
    torch.testing.assert_close(schedule.sigmas.flip(0), euler.sigmas[:-1].double(), rtol=2e-5, atol=0)


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma():
    schedule = NoiseSchedule.from_config(SD)
    euler = scheduler("euler", SD)
    log_sigmas = np.log(vp_sigma(euler.alphas_cumprod).numpy())
    sigmas = torch.cat([torch.logspace(-2, 1.3, 50, dtype=torch.float64), torch.tensor([0.0, 100.0])])
    expected = torch.tensor([float(euler._sigma_to_t(np.array(s), log_sigmas)) for s in sigmas.numpy()])
    torch.testing.assert_close(schedule.sigma_to_t(sigmas), expected.double(), rtol=0, atol=2e-3)
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    assert schedule.sigma_to_t(torch.tensor([1.0])).dtype == torch.float32


FAMILIES = ["ddim", "plms", "ddpm", "euler", "heun", "lms", "dpmpp_2m", "unipc"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_schedule_spacings_match_diffusers(name, spacing):
    config = replace(SD, timestep_spacing=spacing)
    schedule = NoiseSchedule.from_config(config)
    for steps in (1, 7, 10, 25, 50):
        ours = sampling_sigmas(schedule, config, steps, name).double()
        torch.testing.assert_close(ours, diffusers_sigmas(name, config, steps), rtol=2e-5, atol=1e-7)


RAMPS = [(name, "karras") for name in ("euler", "heun", "lms", "dpmpp_2m", "unipc")] + [
    (name, "exponential") for name in ("euler", "dpmpp_2m", "unipc")
]


@pytest.mark.parametrize(("name", "discretisation"), RAMPS)
def test_ramps_match_diffusers(name, discretisation):
    schedule = NoiseSchedule.from_config(SD)
    for steps in (5, 20):
        ours = sampling_sigmas(schedule, SD, steps, name, discretisation).double()
        expected = diffusers_sigmas(name, SD, steps, discretisation)
        torch.testing.assert_close(ours, expected, rtol=2e-5, atol=1e-7)


def test_lcm_timesteps_match_diffusers():
    schedule = NoiseSchedule.from_config(SD)
    for steps in (1, 4, 8):
        ours = sampling_sigmas(schedule, SD, steps, "lcm").double()
        torch.testing.assert_close(ours, diffusers_sigmas("lcm", SD, steps), rtol=2e-5, atol=1e-7)


def test_ddim_and_plms_end_at_sigma_min_unless_alpha_is_set_to_one():
    schedule = NoiseSchedule.from_config(SD)
    assert float(sampling_sigmas(schedule, SD, 10, "ddim")[-1]) == pytest.approx(schedule.sigma_min)
    assert float(sampling_sigmas(schedule, replace(SD, set_alpha_to_one=True), 10, "plms")[-1]) == 0
    assert float(sampling_sigmas(schedule, SD, 10, "ddim", "karras")[-1]) == 0
    assert float(sampling_sigmas(schedule, SD, 10, "euler")[-1]) == 0


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_initial_noise_scale_matches_diffusers(name, spacing):
    config = replace(SD, timestep_spacing=spacing)
    schedule = NoiseSchedule.from_config(config)
    sigmas = sampling_sigmas(schedule, config, 10, name)
    s = scheduler(name, config)
    s.set_timesteps(10)
    vp = name != "euler"  # VP schedulers start from unit-variance x_vp = x_ve / sqrt(1 + sigma^2)
    expected = float(s.init_noise_sigma) * (math.sqrt(1 + float(sigmas[0]) ** 2) if vp else 1.0)
    assert initial_noise_scale(sigmas, config, name) == pytest.approx(expected, rel=1e-5)


def test_to_unit_scale_divides_by_sqrt_one_plus_sigma_squared():
    x = torch.full((1, 4), 3.0)
    torch.testing.assert_close(to_unit_scale(x, torch.tensor(0.75)), x / 1.25)
    assert torch.equal(to_unit_scale(x, 0.0), x)


def test_trailing_spacing_has_exactly_the_requested_steps():
    for steps in (61, 103, 121):  # np.arange with a float step returns one extra point here
        t = spaced_timesteps("trailing", steps, 1000)
        assert len(t) == steps and t.min() >= 0 and t[0] == 999


def test_unknown_names_are_refused():
    schedule = NoiseSchedule.from_config(SD)
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        NoiseSchedule.from_config(replace(SD, beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="unknown discretisation"):
        sampling_sigmas(schedule, SD, 10, "euler", "polyexponential")
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling_sigmas(schedule, SD, 10, "dpm_adaptive")
    with pytest.raises(ValueError, match="steps"):
        sampling_sigmas(schedule, SD, 0, "euler")
