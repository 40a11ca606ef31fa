"""Our Denoiser + samplers against diffusers' scheduler loops on the same toy network and latents.

Tolerances are absolute on unit-scale latents (the toy latents reach |x| ~ 2-16). Reached on CPU
float32: <= 2.1e-5 everywhere except under zero terminal SNR, where DDIM/DDPM start at alpha = 0
exactly in diffusers but at the clamped alpha = 2**-24 (sigma ~ 4096) in VE space (~2.5e-4).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.schedules import (
    NoiseSchedule,
    initial_noise_scale,
    sampling_sigmas,
    to_unit_scale,
)
from latentdiffusion.samplers import GRID_SAMPLERS, sample


class ToyEpsNetwork:
    """A fixed random 1x1 convolution plus smooth functions of t and x: deterministic, cheap, nonlinear."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.5 * torch.eye(channels) + 0.2 * torch.randn(channels, channels, generator=g)
        self.bias = 0.1 * torch.randn(channels, generator=g)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x)
        out = (
            mixed * (1 + 0.2 * torch.cos(t / 300))
            + 0.1 * torch.tanh(x)
            + self.bias.view(1, -1, 1, 1) * torch.sin(t / 500)
        )
        return out.to(x.dtype)


def diffusers_common(config: ScheduleConfig) -> dict:
    beta_schedule = "squaredcos_cap_v2" if config.beta_schedule == "cosine" else config.beta_schedule
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        steps_offset=config.steps_offset,
    )


def diffusers_scheduler(name: str, config: ScheduleConfig, discretisation: str | None = None):
    """The diffusers scheduler our sampler ``name`` reproduces, built from the same config."""
    import diffusers

    common = diffusers_common(config)
    zsnr = {"rescale_betas_zero_snr": config.rescale_zero_terminal_snr}
    ramps = {
        "use_karras_sigmas": discretisation == "karras",
        "use_exponential_sigmas": discretisation == "exponential",
    }
    vp = {"set_alpha_to_one": config.set_alpha_to_one}
    make = {
        "ddim": lambda: diffusers.DDIMScheduler(**common, **zsnr, **vp, clip_sample=False),
        "plms": lambda: diffusers.PNDMScheduler(**common, **vp, skip_prk_steps=True),
        "ddpm": lambda: diffusers.DDPMScheduler(**common, **zsnr, clip_sample=False),
        "euler": lambda: diffusers.EulerDiscreteScheduler(**common, **zsnr, **ramps),
        "euler_ancestral": lambda: diffusers.EulerAncestralDiscreteScheduler(**common, **zsnr),
        "heun": lambda: diffusers.HeunDiscreteScheduler(**common, **ramps),
        "lms": lambda: diffusers.LMSDiscreteScheduler(**common, **ramps),
        "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**common, **zsnr, **ramps),
        "dpmpp_2m_sde": lambda: diffusers.DPMSolverMultistepScheduler(
            **common, **zsnr, **ramps, algorithm_type="sde-dpmsolver++"
        ),
        "unipc": lambda: diffusers.UniPCMultistepScheduler(**common, **zsnr, **ramps),
        "lcm": lambda: diffusers.LCMScheduler(**common, **zsnr),
        "tcd": lambda: diffusers.TCDScheduler(**common, **zsnr),
    }
    return make[name]()


def run_diffusers(
    scheduler, network, noise: Tensor, steps: int, seed: int | None = None, **step_options
) -> Tensor:
    """The standard diffusers denoising loop; returns the final latent (unit scale)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    if seed is not None:
        step_options["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        output = network(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x, **step_options).prev_sample
    return x


# scaled_linear 0.00085..0.012, epsilon, leading, steps_offset 1, set_alpha_to_one False
SD = ScheduleConfig()
V_TRAILING = replace(SD, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
V_ZERO_SNR = replace(V_TRAILING, rescale_zero_terminal_snr=True)
STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm", "tcd")
# diffusers feeds these fractional timesteps off the training grid (Karras / exponential ramps, linspace
# spacing); the others round Karras timesteps and keep integer ones elsewhere.
FRACTIONAL = ("euler", "euler_ancestral", "heun", "lms")


def ours(name: str, config: ScheduleConfig, noise, steps: int, discretisation=None, seed=None, **options):
    schedule = NoiseSchedule.from_config(config)
    sigmas = sampling_sigmas(schedule, config, steps, name, discretisation)
    rounded = name not in FRACTIONAL
    denoiser = Denoiser(ToyEpsNetwork(), schedule, config.prediction_type, round_timesteps=rounded)
    x = noise * initial_noise_scale(sigmas, config, name)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if name in GRID_SAMPLERS:
        options["schedule"] = schedule
    return to_unit_scale(sample(name, denoiser, x, sigmas, generator=generator, **options), sigmas[-1])


def theirs(name: str, config: ScheduleConfig, noise, steps: int, discretisation=None, seed=None, **options):
    scheduler = diffusers_scheduler(name, config, discretisation)
    return run_diffusers(scheduler, ToyEpsNetwork(), noise, steps, seed, **options)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


CASES = [
    # (sampler, discretisation, configs, tolerance)
    ("ddim", None, (SD, V_TRAILING), 3e-5),
    ("plms", None, (SD,), 3e-5),
    ("ddpm", None, (SD, V_TRAILING), 3e-5),
    ("euler", None, (SD, V_TRAILING, V_ZERO_SNR), 5e-5),
    ("euler", "karras", (SD, V_TRAILING), 3e-5),
    ("euler", "exponential", (SD,), 3e-5),
    ("euler_ancestral", None, (SD, V_TRAILING, V_ZERO_SNR), 3e-5),
    ("heun", None, (SD, V_TRAILING), 3e-5),
    ("heun", "karras", (SD,), 3e-5),
    ("lms", None, (SD, V_TRAILING), 3e-5),
    ("lms", "karras", (SD,), 3e-5),
    ("dpmpp_2m", None, (SD, V_TRAILING, V_ZERO_SNR), 3e-5),
    ("dpmpp_2m", "karras", (SD, V_TRAILING), 3e-5),
    ("dpmpp_2m_sde", None, (SD, V_TRAILING, V_ZERO_SNR), 3e-5),
    ("dpmpp_2m_sde", "karras", (SD,), 5e-5),
    ("unipc", None, (SD, V_TRAILING, V_ZERO_SNR), 3e-5),
    ("unipc", "karras", (SD, V_TRAILING), 3e-5),
    ("lcm", None, (SD, V_TRAILING, V_ZERO_SNR), 3e-5),
    ("tcd", None, (SD, V_TRAILING, V_ZERO_SNR), 5e-5),
]


@pytest.mark.parametrize(("name", "discretisation", "configs", "tolerance"), CASES)
def test_sampler_matches_diffusers(noise, name, discretisation, configs, tolerance):
    steps = 4 if name in GRID_SAMPLERS else 10
    seed = 3 if name in STOCHASTIC else None
    for config in configs:
        expected = theirs(name, config, noise, steps, discretisation, seed)
        actual = ours(name, config, noise, steps, discretisation, seed)
        error = (actual - expected).abs().max().item()
        assert error < tolerance, f"{name} {discretisation} {config}: max error {error:.2e}"


@pytest.mark.parametrize("config", [SD, V_TRAILING])
def test_ddim_eta_one_matches_diffusers(noise, config):
    expected = theirs("ddim", config, noise, 10, seed=5, eta=1.0)
    actual = ours("ddim", config, noise, 10, seed=5, eta=1.0)
    assert (actual - expected).abs().max() < 3e-5


@pytest.mark.parametrize(
    ("spacing", "steps"), [("leading", 7), ("leading", 30), ("linspace", 7), ("trailing", 25)]
)
def test_other_spacings_match_diffusers(noise, spacing, steps):
    config = replace(SD, timestep_spacing=spacing)
    names = ("euler", "dpmpp_2m", "unipc") + (("ddim",) if spacing != "linspace" else ())
    for name in names:
        error = (ours(name, config, noise, steps) - theirs(name, config, noise, steps)).abs().max()
        assert error < 5e-5, f"{name} {spacing} {steps}: {error:.2e}"


def test_zero_terminal_snr_ddim_within_clamp_error(noise):
    for name in ("ddim", "ddpm"):
        seed = 3 if name == "ddpm" else None
        error = ours(name, V_ZERO_SNR, noise, 10, seed=seed) - theirs(name, V_ZERO_SNR, noise, 10, seed=seed)
        assert error.abs().max() < 5e-4


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_gamma_matches_diffusers(noise, steps, gamma):
    for config in (SD, V_TRAILING):
        expected = theirs("tcd", config, noise, steps, seed=4, eta=gamma)
        actual = ours("tcd", config, noise, steps, seed=4, eta=gamma)
        assert (actual - expected).abs().max() < 3e-5, f"{config} {steps} steps, gamma {gamma}"


def run_on_timesteps(name: str, config: ScheduleConfig, noise, timesteps: list[int], seed: int, **options):
    """Ours and diffusers' on the same custom timesteps (LCM/TCD accept them); also ours without the
    training schedule."""
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(timesteps=timesteps)
    network, generator = ToyEpsNetwork(), torch.Generator().manual_seed(seed)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, t), t, x, generator=generator, **options).prev_sample
    schedule = NoiseSchedule.from_config(config)
    levels = schedule.t_to_sigma(torch.tensor(timesteps, dtype=torch.float64))
    sigmas = torch.cat([levels, levels.new_zeros(1)]).float()
    denoiser = Denoiser(network, schedule, config.prediction_type)
    start = noise * float(torch.sqrt(1 + sigmas[0].double() ** 2))

    def run(**grid):
        out = sample(name, denoiser, start, sigmas, generator=torch.Generator().manual_seed(seed), **grid)
        return to_unit_scale(out, sigmas[-1])

    return x, run(schedule=schedule, **options), run


@pytest.mark.parametrize("config", [SD, V_TRAILING])
def test_lcm_boundary_scalings_match_diffusers_at_small_timesteps(noise, config):
    """At t = 1..9 LCM's c_skip is 0.0025..3e-5 of the sample: the scalings show; without the schedule
    (no scalings) the result is off."""
    expected, actual, run = run_on_timesteps("lcm", config, noise, [999, 499, 99, 9, 1], seed=2)
    assert (actual - expected).abs().max() < 3e-5
    assert (run() - expected).abs().max() > 1e-3
