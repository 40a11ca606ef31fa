"""Noise schedules: betas, alphas_cumprod, VE noise levels, and the sigma lists samplers integrate over.

Samplers work in the variance-exploding (VE) parameterisation of Karras et al. 2022 (EDM, Sec. 2 and
Table 1): a discrete variance-preserving (VP) training schedule with ``alphas_cumprod`` becomes
``x_ve = x_vp / sqrt(alphas_cumprod)`` with noise level
``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``.

``sampling_sigmas`` reproduces, for each sampler, the noise levels of the matching diffusers scheduler
with the same configuration, so that our samplers and diffusers' give the same latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from latentdiffusion.config import ScheduleConfig

# Under zero terminal SNR alphas_cumprod[-1] is 0 and sigma would be infinite; like diffusers we clamp it
# to the smallest positive float16 subnormal, which gives a finite sigma of about 4096.
MIN_ALPHAS_CUMPROD = 2.0**-24
# That sigma, sqrt(2**24 - 1), is 4096 in float32; rectified flow caps its t = 1 there too
# (``process.FLOW_SIGMA_MAX``). Samplers take levels at the cap for infinite noise.
SIGMA_CAP = 4096.0


def betas_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """The linear schedule of Ho et al. 2020 (DDPM, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def betas_scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022): linear in sqrt(beta)."""
    sqrt_betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
    return sqrt_betas**2


def betas_cosine(num_train_timesteps: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2), betas capped."""
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


BETA_SCHEDULES: dict[str, Callable[[ScheduleConfig], Tensor]] = {
    "linear": lambda c: betas_linear(c.num_train_timesteps, c.beta_start, c.beta_end),
    "scaled_linear": lambda c: betas_scaled_linear(c.num_train_timesteps, c.beta_start, c.beta_end),
    "cosine": lambda c: betas_cosine(c.num_train_timesteps),
}


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR 0.

    The first step keeps its value; the last becomes exactly 0 (pure noise).
    """
    sqrt_ac = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def betas_from_config(config: ScheduleConfig) -> Tensor:
    """The training betas [num_train_timesteps] in float64, rescaled to zero terminal SNR if asked."""
    try:
        make = BETA_SCHEDULES[config.beta_schedule]
    except KeyError:
        known = ", ".join(BETA_SCHEDULES)
        raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}; known: {known}") from None
    betas = make(config)
    return rescale_zero_terminal_snr(betas) if config.rescale_zero_terminal_snr else betas


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """VE noise levels sigma = sqrt((1 - a) / a) (Karras et al. 2022, Table 1, VP column)."""
    alphas_cumprod = alphas_cumprod.clamp(min=MIN_ALPHAS_CUMPROD)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete training schedule: alphas_cumprod and the VE noise level of every training timestep.

    ``sigmas[t]`` is ascending in ``t``. Continuous ``t`` maps to sigma and back by interpolation, as
    k-diffusion's DiscreteSchedule and diffusers' schedulers do.
    """

    alphas_cumprod: Tensor  # [T] float64, exactly 0 at t = T - 1 under zero terminal SNR
    sigmas: Tensor  # [T] float64, finite (alphas_cumprod clamped to 2**-24)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        alphas_cumprod = torch.cumprod(1 - betas_from_config(config), dim=0)
        return cls(alphas_cumprod, sigmas_from_alphas_cumprod(alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of each noise level: linear interpolation in log sigma.

        Levels outside the training range map to the nearest end (0 or T - 1). Computed on sigma's
        device in float32, or float64 when sigma is float64.
        """
        dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        log_sigmas = self.sigmas.log().to(sigma.device, dtype)
        log_sigma = sigma.to(dtype).clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
        w = ((low_value - log_sigma) / (low_value - high_value)).clamp(0, 1)
        return low.to(dtype) + w

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Noise level at continuous timestep ``t``: linear interpolation in sigma (diffusers' np.interp)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().clamp(max=self.num_train_timesteps - 2).long()
        w = t - low
        sigmas = self.sigmas.to(t.device)
        return (1 - w) * sigmas[low] + w * sigmas[low + 1]


# ---------------------------------------------------------------------------------------------------
# Discretisations: which noise levels a sampler visits.
# ---------------------------------------------------------------------------------------------------

SPACINGS = ("leading", "trailing", "linspace")
# ComfyUI's schedulers with no diffusers counterpart, read off the training table (end of this file)
TABLE_DISCRETISATION_NAMES = ("sgm_uniform", "beta", "linear_quadratic", "kl_optimal")
DISCRETISATIONS = (*SPACINGS, "karras", "exponential", *TABLE_DISCRETISATION_NAMES)


def spaced_timesteps(
    spacing: str,
    steps: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    *,
    skip_zero: bool = False,
    integer: bool = True,
) -> np.ndarray:
    """Descending training timesteps for ``steps`` steps (Lin et al. 2024, Table 2), as diffusers does.

    ``skip_zero``: the multistep (DPM-Solver, UniPC) variant that spaces ``steps + 1`` points and drops
    the one at t = 0. ``integer=False``: linspace keeps fractional timesteps (the Euler family).
    """
    points = steps + 1 if skip_zero else steps
    T = num_train_timesteps
    if spacing == "leading":
        t = (np.arange(points) * (T // points)).round()[::-1] + steps_offset
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, points)[::-1]
        t = t.round() if integer else t.astype(np.float32).astype(np.float64)
    elif spacing == "trailing":
        # i * T / steps by index rather than np.arange with a float step, which for some step counts
        # (61, 103, ...) yields one extra point at t = -1.
        t = np.round(T - np.arange(steps) * (T / steps)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    return np.ascontiguousarray(t[:steps], dtype=np.float64)


def lcm_timesteps(steps: int, num_train_timesteps: int, original_steps: int = 50) -> np.ndarray:
    """Luo et al. 2023 (LCM): ``steps`` evenly skipped points of the distillation schedule of
    ``original_steps`` timesteps (k * i - 1), as diffusers' LCMScheduler chooses them."""
    if steps > original_steps:
        raise ValueError(f"LCM sampling supports at most {original_steps} steps, got {steps}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.float64)


def sigmas_karras(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Karras et al. 2022, Eq. 5: ``steps`` levels evenly spaced in sigma^(1/rho), descending, no final 0.

    ``dtype``: the precision of the ramp (float32 reproduces k-diffusion's and ComfyUI's rounding)."""
    ramp = torch.linspace(0, 1, steps, dtype=dtype)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigmas_exponential(
    steps: int, sigma_min: float, sigma_max: float, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``steps`` levels evenly spaced in log sigma, descending, no final 0 (``dtype`` as for karras)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=dtype).exp()


# Which diffusers scheduler family each sampler reproduces; the families space timesteps differently.
_DDPM, _KARRAS, _MULTISTEP, _LCM = "ddpm", "karras", "multistep", "lcm"
SAMPLER_FAMILIES: dict[str, str] = {
    "ddim": _DDPM,  # DDIMScheduler
    "plms": _DDPM,  # PNDMScheduler(skip_prk_steps=True)
    "ddpm": _DDPM,  # DDPMScheduler
    "euler": _KARRAS,  # EulerDiscreteScheduler
    "euler_ancestral": _KARRAS,  # EulerAncestralDiscreteScheduler
    "heun": _KARRAS,  # HeunDiscreteScheduler
    "dpm_2": _KARRAS,  # KDPM2DiscreteScheduler
    "dpm_2_ancestral": _KARRAS,  # KDPM2AncestralDiscreteScheduler
    "lms": _KARRAS,  # LMSDiscreteScheduler
    "dpmpp_2m": _MULTISTEP,  # DPMSolverMultistepScheduler
    "dpmpp_2m_sde": _MULTISTEP,
    "unipc": _MULTISTEP,  # UniPCMultistepScheduler
    "lcm": _LCM,  # LCMScheduler
    "tcd": _LCM,  # TCDScheduler: the same distillation timesteps
}
_ENDS_AT_SIGMA_MIN = ("ddim", "plms")  # with set_alpha_to_one=False they stop at sigma(t=0)
_ALWAYS_ENDS_AT_SIGMA_MIN = ("tcd",)  # TCDScheduler's last step lands on timestep 0 whatever the config


def _family(sampler: str) -> str:
    try:
        return SAMPLER_FAMILIES[sampler]
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLER_FAMILIES)}") from None


def _timesteps_for(config: ScheduleConfig, steps: int, sampler: str, spacing: str) -> np.ndarray:
    family, T = _family(sampler), config.num_train_timesteps
    if family == _LCM:
        return lcm_timesteps(steps, T)
    offset = config.steps_offset
    if family == _MULTISTEP:
        return spaced_timesteps(spacing, steps, T, offset, skip_zero=True)
    return spaced_timesteps(spacing, steps, T, offset, integer=family == _DDPM)


def _final_sigma(schedule: NoiseSchedule, config: ScheduleConfig, sampler: str) -> float:
    if sampler in _ALWAYS_ENDS_AT_SIGMA_MIN:
        return schedule.sigma_min
    if sampler in _ENDS_AT_SIGMA_MIN and not config.set_alpha_to_one:
        return schedule.sigma_min
    return 0.0


def _ramp_range(
    schedule: NoiseSchedule, config: ScheduleConfig, steps: int, sampler: str
) -> tuple[float, float]:
    """The (sigma_min, sigma_max) a Karras/exponential ramp spans: the full training range, except for
    the Euler family, whose diffusers schedulers ramp between the spaced timesteps' levels."""
    if _family(sampler) != _KARRAS:
        return schedule.sigma_min, schedule.sigma_max
    spaced = schedule.t_to_sigma(
        torch.from_numpy(_timesteps_for(config, steps, sampler, config.timestep_spacing))
    )
    return float(spaced[-1]), float(spaced[0])


def sampling_sigmas(
    schedule: NoiseSchedule,
    config: ScheduleConfig,
    steps: int,
    sampler: str,
    discretisation: str | None = None,
) -> Tensor:
    """The descending noise levels [steps + 1] (float32) that ``sampler`` visits.

    ``discretisation``: None (the config's own timestep spacing), "leading", "trailing", "linspace",
    "karras" (Karras et al. 2022, rho 7), "exponential", or one of ComfyUI's table schedulers
    (``TABLE_DISCRETISATIONS``: "sgm_uniform", "beta" (which may give fewer levels), "linear_quadratic",
    "kl_optimal", exactly as ComfyUI computes them). The levels are those of the matching diffusers
    scheduler with the same config. DDIM and PLMS with ``set_alpha_to_one=False``, and TCD always, stop at
    sigma(t=0), not 0; convert their result with ``to_unit_scale``. Ramps (karras, exponential) always end
    at 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    discretisation = discretisation or config.timestep_spacing
    if discretisation in SPACINGS:  # LCM keeps its own distillation timesteps whatever the spacing
        t = torch.from_numpy(_timesteps_for(config, steps, sampler, discretisation))
        levels, final = schedule.t_to_sigma(t), _final_sigma(schedule, config, sampler)
    elif discretisation in ("karras", "exponential"):
        ramp = sigmas_karras if discretisation == "karras" else sigmas_exponential
        levels, final = ramp(steps, *_ramp_range(schedule, config, steps, sampler)), 0.0
    elif discretisation in TABLE_DISCRETISATIONS:
        return TABLE_DISCRETISATIONS[discretisation](schedule.sigmas, steps)
    else:
        raise ValueError(f"unknown discretisation {discretisation!r}; known: {', '.join(DISCRETISATIONS)}")
    return torch.cat([levels, levels.new_tensor([final])]).float()


def to_unit_scale(x: Tensor, sigma_last: Tensor | float) -> Tensor:
    """VE latent at noise level ``sigma_last`` -> the network's unit-scale (VP) latent: x / sqrt(1 + sigma^2).

    The identity when the sigma list ends at 0; DDIM/PLMS with set_alpha_to_one=False end at sigma(t=0).
    """
    return x * (1.0 / math.sqrt(1.0 + float(sigma_last) ** 2))


def initial_noise_scale(sigmas: Tensor, config: ScheduleConfig, sampler: str) -> float:
    """Factor that turns unit-variance noise into the starting VE latent, as diffusers scales it.

    VP schedulers (DDIM, PLMS, DDPM, DPM-Solver, UniPC, LCM) start from unit-variance x_vp, i.e.
    x_ve = noise * sqrt(1 + sigma_max^2); the Euler family uses the same for "leading" spacing and
    sigma_max otherwise. (k-diffusion always uses sigma_max = sigmas[0].)
    """
    sigma_max = float(sigmas[0])
    if _family(sampler) == _KARRAS and config.timestep_spacing != "leading":
        return sigma_max
    return math.sqrt(1.0 + sigma_max**2)


# ---------------------------------------------------------------------------------------------------
# Discretisations over the training table (ComfyUI's schedulers, ``comfy/samplers.py``). They read the
# ascending table of training levels (ComfyUI's ``ModelSamplingDiscrete.sigmas``, float32) and return
# descending float32 levels ending in 0. Continuous t maps to sigma by interpolating log sigma. Pass the
# float64 table (``NoiseSchedule.sigmas``): ComfyUI takes the logs before rounding to float32.
# ---------------------------------------------------------------------------------------------------


def table_sigma(table: Tensor, t: Tensor) -> Tensor:
    """The level at continuous timestep ``t``: linear interpolation of log sigma between table entries
    (float32, as ComfyUI's ``ModelSamplingDiscrete.sigma``)."""
    log_table = table.log().float()
    t = t.float().clamp(0, len(table) - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def table_timestep(table: Tensor, sigma: Tensor) -> Tensor:
    """The index of the table entry nearest to ``sigma`` in log sigma (ComfyUI's ``timestep``: the
    network is evaluated there, a whole training step)."""
    log_table = table.log().float().to(sigma.device)
    return (sigma.float().log()[None] - log_table[:, None]).abs().argmin(dim=0)


def _with_zero(levels: list[float] | Tensor) -> Tensor:
    levels = torch.as_tensor(levels, dtype=torch.float32)
    return torch.cat([levels, levels.new_zeros(1)])


def sigmas_uniform_t(table: Tensor, steps: int, *, sgm: bool = False) -> Tensor:
    """ComfyUI's "normal" (``steps`` timesteps evenly from T - 1 to 0, both ends included) and
    "sgm_uniform" (``steps + 1`` points, the one at 0 dropped: Stability's sgm discretisation)."""
    start = float(table_timestep(table, table[-1:])[0])
    end = float(table_timestep(table, table[:1])[0])
    t = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return _with_zero(table_sigma(table, t))


def sigmas_simple(table: Tensor, steps: int) -> Tensor:
    """ComfyUI's "simple": every (T / steps)-th table entry from the top."""
    stride = len(table) / steps
    return _with_zero([float(table[-(1 + int(i * stride))]) for i in range(steps)])


def sigmas_ddim_uniform(table: Tensor, steps: int) -> Tensor:
    """ComfyUI's "ddim_uniform": entries 1, 1 + k, 1 + 2k, ... (k = T // steps), descending."""
    stride = max(len(table) // steps, 1)
    levels = [float(table[i]) for i in range(1, len(table), stride)]
    return _with_zero(levels[::-1])


def beta_quantile_timesteps(steps: int, num_train_timesteps: int, alpha: float, beta: float) -> list[int]:
    """Lee et al. 2024 ("Beta sampling is all you need", arXiv:2407.12173): timesteps at the quantiles
    1, 1 - 1/steps, ... of a Beta(alpha, beta) distribution, rounded to the grid, repeats dropped."""
    from scipy.stats import beta as beta_distribution  # scipy is needed only here

    q = 1 - np.linspace(0, 1, steps, endpoint=False)
    t = np.rint(beta_distribution.ppf(q, alpha, beta) * (num_train_timesteps - 1)).astype(int)
    return [int(v) for i, v in enumerate(t) if i == 0 or v != t[i - 1]]


def sigmas_beta(table: Tensor, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's "beta" (alpha = beta = 0.6): table entries at Beta-quantile timesteps; fewer than
    ``steps`` levels when quantiles round to the same timestep."""
    return _with_zero([float(table[t]) for t in beta_quantile_timesteps(steps, len(table), alpha, beta)])


def sigmas_linear_quadratic(
    steps: int, sigma_max: float, threshold: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """Genmo's Mochi schedule (ComfyUI's "linear_quadratic"): 1 - s with s rising linearly to
    ``threshold`` over the first half of the steps and quadratically to 1 over the rest, times sigma_max."""
    if steps == 1:
        return torch.tensor([1.0, 0.0]) * torch.tensor(sigma_max, dtype=torch.float32)
    n_lin = steps // 2 if linear_steps is None else linear_steps
    n_quad = steps - n_lin
    rise = n_lin - threshold * steps
    a = rise / (n_lin * n_quad**2)
    b = threshold / n_lin - 2 * rise / n_quad**2
    s = [i * threshold / n_lin for i in range(n_lin)]
    s += [a * i**2 + b * i + a * n_lin**2 for i in range(n_lin, steps)]
    return torch.tensor([1.0 - v for v in [*s, 1.0]]) * torch.tensor(sigma_max, dtype=torch.float32)


def sigmas_kl_optimal(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The KL-optimal schedule (Sabour et al. 2024, "Align your steps", Eq. 9; ComfyUI's "kl_optimal"):
    levels evenly spaced in arctan(sigma), float32. One step is sigma_max alone."""
    ramp = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    levels = (ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan()
    return _with_zero(levels)


def _sigmas_sgm_uniform(table: Tensor, steps: int) -> Tensor:
    return sigmas_uniform_t(table, steps, sgm=True)


def _sigmas_linear_quadratic(table: Tensor, steps: int) -> Tensor:
    return sigmas_linear_quadratic(steps, float(table.float()[-1]))


def _sigmas_kl_optimal(table: Tensor, steps: int) -> Tensor:
    ends = table.float()
    return sigmas_kl_optimal(steps, float(ends[0]), float(ends[-1]))


# name -> (float64 training table, steps) -> descending float32 levels ending in 0
TABLE_DISCRETISATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "sgm_uniform": _sigmas_sgm_uniform,
    "beta": sigmas_beta,
    "linear_quadratic": _sigmas_linear_quadratic,
    "kl_optimal": _sigmas_kl_optimal,
}
