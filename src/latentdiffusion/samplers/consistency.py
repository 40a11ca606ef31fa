"""Few-step samplers of consistency-distilled models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024).

Both step on the discrete training grid their models were distilled on, so they take the model's
``NoiseSchedule`` (``schedule=``) besides the noise levels: LCM to find the timestep of each level for its
boundary-condition scalings, TCD to find the intermediate level s of its strategic stochastic step.
Without a schedule (a flow model has none) LCM runs without the scalings and TCD is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentdiffusion.diffusion.noise import Generators, randn_like
from latentdiffusion.diffusion.schedules import NoiseSchedule
from latentdiffusion.samplers.common import Callback, Denoiser, denoise, intervals, noise_levels, to_d

# what a consistency-distilled student samples with unless asked otherwise (``ldm finetune --lcm``); its
# teacher's epsilon scaling is not the student's
LCM_DEFAULTS = {
    "default_sampler": "lcm",
    "default_steps": 4,
    "default_guidance_scale": 1.0,
    "default_eps_scaling": 1.0,
}
SIGMA_DATA = 0.5  # LCM's sigma_data (Luo et al. 2023, Sec. 4.1, following Song et al. 2023)
TIMESTEP_SCALING = 10.0  # LCM's factor on the discrete timestep inside c_skip and c_out


def grid_timestep(schedule: NoiseSchedule, sigma: float) -> int:
    """The whole training timestep of a noise level (levels of the grid map back to themselves)."""
    return int(schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64)).round().item())


def boundary_scalings(t: float | Tensor) -> tuple[float | Tensor, float | Tensor]:
    """LCM's consistency parameterisation f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (Luo et al. 2023,
    Eq. 9; Song et al. 2023, Eq. 7): with t' = 10 t, c_skip = sigma_data^2 / (t'^2 + sigma_data^2) and
    c_out = t' / sqrt(t'^2 + sigma_data^2), so that f(x, 0) = x (the boundary condition). ``t``: a number
    or a tensor of timesteps (training, ``training.consistency``)."""
    scaled = t * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def consistency_output(x: Tensor, x0: Tensor, sigma: float, t: float) -> Tensor:
    """f(x, t) from the network's x0 estimate; c_skip multiplies the network-scale (VP) sample
    x / sqrt(1 + sigma^2), as the model was distilled."""
    c_skip, c_out = boundary_scalings(t)
    return c_out * x0 + (c_skip / math.sqrt(1.0 + sigma**2)) * x


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    schedule: NoiseSchedule | None = None,
) -> Tensor:
    """Latent consistency model multistep sampling (Luo et al. 2023, Alg. 1; Song et al. 2023, Alg. 1).

    Each step maps x to the consistency function's output f(x, t) (``consistency_output``, with the
    boundary scalings at the level's training timestep when ``schedule`` is given), then re-noises it to
    the next level with fresh noise; the last step returns f(x, t) itself.
    """
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise(denoiser, x, sigma)
        if schedule is not None:
            x0 = consistency_output(x, x0, sigma, grid_timestep(schedule, sigma))
        if callback is not None:
            callback(i, sigma, x, x0)
        x = x0 + sigma_next * randn_like(x0, generator) if sigma_next > 0 else x0
    return x


def tcd_intermediate_sigma(schedule: NoiseSchedule, sigma_next: float, gamma: float) -> float:
    """The level s of TCD's strategic stochastic sampling (Zheng et al. 2024, Sec. 4.2, Eq. 13): the
    timestep floor((1 - gamma) t_next) of the training grid; 0 when the next level is 0."""
    if sigma_next == 0:
        return 0.0
    t_s = math.floor((1.0 - gamma) * grid_timestep(schedule, sigma_next))
    return float(schedule.t_to_sigma(torch.tensor(float(t_s), dtype=torch.float64)))


def sample_tcd(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    schedule: NoiseSchedule | None = None,
    eta: float = 0.3,
) -> Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, Alg. 4).

    It steps as diffusers' TCDScheduler does.

    ``eta`` is the paper's gamma in [0, 1]: each step jumps along the predicted trajectory (a DDIM step)
    from sigma to the earlier level s = sigma(floor((1 - gamma) t_next)), then adds fresh noise from s up
    to sigma_next. gamma = 0 is deterministic (s = sigma_next); gamma = 1 jumps to x0 and re-noises, as
    LCM does without the boundary scalings. The last step adds no noise. TCD's levels end at sigma(t = 0)
    (``schedules.sampling_sigmas``), where it stops.
    """
    if schedule is None:
        raise ValueError("the TCD sampler steps on a discrete training schedule: give schedule=")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD's gamma (eta) must be between 0 and 1, got {eta}")
    last = len(noise_levels(sigmas)) - 2
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, sigma, x, x0)
        sigma_s = tcd_intermediate_sigma(schedule, sigma_next, eta)
        x = x0 + sigma_s * to_d(x, x0, sigma)
        if eta > 0 and i < last:  # noise is drawn even where s = sigma_next, as the scheduler does
            x = x + math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0)) * randn_like(x, generator)
    return x
