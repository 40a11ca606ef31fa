"""The noise process: how a clean latent becomes noise, written once for samplers, pipelines and training.

Samplers integrate the variance-exploding form ``x = x0 + sigma * eps`` (Karras et al. 2022, EDM) over a
denoiser D(x, sigma) -> x0 whatever the process; a process says how that VE latent and noise level map to
the network's input, its timestep and its output, which noise levels a sampler visits, and how training
noises a latent and what the network regresses to.

- ``DiscreteVP``: the variance-preserving discrete schedule of DDPM and Stable Diffusion 1/2/XL
  (``x_vp = sqrt(a) x0 + sqrt(1 - a) eps``; ``schedules.NoiseSchedule``).
- ``RectifiedFlow``: rectified flow, ``x_t = (1 - t) x0 + t eps`` with t in [0, 1] (Liu et al. 2023;
  Esser et al. 2024, SD3, Sec. 2-3). Dividing by 1 - t gives the VE form with sigma = t / (1 - t), so the
  network input is ``x * c_in`` with c_in = 1 / (1 + sigma) = 1 - t, its timestep is t * T (fractional,
  as SD3 is sampled) and its velocity v = eps - x0 gives x0 = x_t - t v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion import schedules
from latentdiffusion.diffusion.parameterization import c_in as vp_c_in
from latentdiffusion.diffusion.parameterization import prediction_to_x0, training_target

PROCESSES = ("discrete", "flow")
DISCRETE_PREDICTIONS = ("epsilon", "v_prediction", "sample")
# v-prediction is tied to the VP scaling (Salimans & Ho 2022); eps and x0 targets are process-free.
FLOW_PREDICTIONS = ("flow", "epsilon", "sample")

# At t = 1 (pure noise) sigma = t / (1 - t) is infinite. As for zero terminal SNR in the discrete schedule
# (schedules.MIN_ALPHAS_CUMPROD) the level is capped at 4096 and that cap stands for t = 1: the network sees
# timestep T and input x * c_in = the starting noise exactly. What the cap costs is the VE step from 4096
# instead of infinity: the first step's eps estimate (x - x0) / sigma carries an extra v / 4096, which
# moves the latent by t_next * v / 4096 (< 2.5e-4 |v|: about 1e-4 of a unit-variance latent). A larger cap
# would shrink that but grow float32 rounding in the samplers' x + h d steps (LMS, PLMS: about
# sigma_max * 2**-24 * |x| / (1 + sigma_next)) and the error of trapezoidal/multistep first steps (Heun,
# PLMS), which grows with sigma_max / sigma_next**2; those samplers take an Euler step from the cap
# (``samplers.common.from_infinity``).
FLOW_SIGMA_MAX = schedules.SIGMA_CAP

# Which diffusers scheduler spaces a sampler's levels for a flow model: DPMSolverMultistepScheduler and
# UniPCMultistepScheduler with use_flow_sigmas=True for their solvers, FlowMatchEulerDiscreteScheduler for
# every other sampler (Euler's own; the others have no diffusers flow scheduler of their own, or one that
# spaces its levels as FlowMatchEuler does).
FLOW_DPM_SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde")


class Draws(Protocol):
    """Per-sample random draws [n] (``training.task.StepRandom``)."""

    def randn(self, *shape: int, device: torch.device | None = None) -> Tensor: ...
    def rand(self, device: torch.device | None = None) -> Tensor: ...
    def randint(self, high: int, device: torch.device | None = None) -> Tensor: ...


def check_prediction_type(process: str, prediction_type: str) -> None:
    """The network outputs a process can turn into x0 (ValueError otherwise)."""
    known = FLOW_PREDICTIONS if process == "flow" else DISCRETE_PREDICTIONS
    if prediction_type not in known:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r} for the {process!r} noise process; "
            f"known: {', '.join(known)}"
        )


def process_from_config(config: ScheduleConfig) -> NoiseProcess:
    """The noise process a model's schedule config describes (``ScheduleConfig.process``)."""
    if config.process == "discrete":
        return DiscreteVP(config)
    if config.process == "flow":
        return RectifiedFlow(config.shift, config.num_train_timesteps, config)
    raise ValueError(f"unknown noise process {config.process!r}; known: {', '.join(PROCESSES)}")


class NoiseProcess:
    """What every process gives (see the module docstring); sigmas are VE noise levels."""

    name: str = ""
    config: ScheduleConfig
    num_train_timesteps: int

    # --- sampling -------------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        raise NotImplementedError

    def c_in(self, sigma: Tensor) -> Tensor:
        """The network-input scale of the VE latent at ``sigma``."""
        raise NotImplementedError

    def timestep(self, sigma: Tensor, round_timesteps: bool = True) -> Tensor:
        """The network's timestep [batch] for noise levels ``sigma`` [batch] (float32; flow keeps float64
        levels' precision)."""
        raise NotImplementedError

    def to_x0(self, prediction_type: str, x: Tensor, prediction: Tensor, sigma: Tensor) -> Tensor:
        """The x0 estimate from the network output; ``sigma`` broadcasts against the VE latent ``x``."""
        check_prediction_type(self.name, prediction_type)
        return prediction_to_x0(prediction_type, x, prediction, sigma)

    def sampling_sigmas(self, steps: int, sampler: str, discretisation: str | None = None) -> Tensor:
        """The descending noise levels [steps + 1] (float32) that ``sampler`` visits."""
        raise NotImplementedError

    def initial_noise_scale(self, sigmas: Tensor, sampler: str, discretisation: str | None = None) -> float:
        """Factor from unit-variance noise to the starting VE latent of a run from pure noise."""
        raise NotImplementedError

    def to_unit_scale(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """VE latent at ``sigma`` -> the network's scale (x * c_in); the identity at sigma = 0."""
        return x * float(self.c_in(torch.tensor(float(sigma), dtype=torch.float64)))

    def from_unit_scale(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The network-scale latent at ``sigma`` -> the VE latent (x / c_in)."""
        return x * (1.0 / float(self.c_in(torch.tensor(float(sigma), dtype=torch.float64))))

    # --- training -------------------------------------------------------------------------------
    def training_times(self, random: Draws, shift: float = 1.0, device: torch.device | None = None) -> Tensor:
        """Training times [n] drawn from ``random``; ``shift`` > 1 moves them towards high noise
        (Esser et al. 2024, Sec. 5.3.2)."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, eps: Tensor, times: Tensor) -> Tensor:
        """The noisy network input at ``times`` [n]."""
        raise NotImplementedError

    def training_target(self, prediction_type: str, x0: Tensor, eps: Tensor, times: Tensor) -> Tensor:
        raise NotImplementedError

    def network_timestep(self, times: Tensor) -> Tensor:
        """The timestep the network is given in training for ``times``."""
        raise NotImplementedError

    def alphas_cumprod(self, times: Tensor) -> Tensor:
        """The VP alpha_bar = SNR / (1 + SNR) at ``times`` (loss weighting)."""
        raise NotImplementedError


def _flat(times: Tensor, x: Tensor) -> Tensor:
    return times.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass(eq=False)
class DiscreteVP(NoiseProcess):
    """The discrete variance-preserving process (Ho et al. 2020; Rombach et al. 2022) of a ScheduleConfig,
    sampled as the matching diffusers schedulers do (``schedules.sampling_sigmas``)."""

    config: ScheduleConfig = field(default_factory=ScheduleConfig)
    schedule: schedules.NoiseSchedule | None = None
    name: str = "discrete"

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = schedules.NoiseSchedule.from_config(self.config)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def c_in(self, sigma: Tensor) -> Tensor:
        return vp_c_in(sigma)

    def timestep(self, sigma: Tensor, round_timesteps: bool = True) -> Tensor:
        t = self.schedule.sigma_to_t(sigma)
        return (t.round() if round_timesteps else t).float()

    def sampling_sigmas(self, steps: int, sampler: str, discretisation: str | None = None) -> Tensor:
        return schedules.sampling_sigmas(self.schedule, self.config, steps, sampler, discretisation)

    def initial_noise_scale(self, sigmas: Tensor, sampler: str, discretisation: str | None = None) -> float:
        config = self.config
        if discretisation in schedules.SPACINGS:
            config = replace(config, timestep_spacing=discretisation)
        return schedules.initial_noise_scale(sigmas, config, sampler)

    def training_times(self, random: Draws, shift: float = 1.0, device: torch.device | None = None) -> Tensor:
        """Whole timesteps, uniform over [0, T) (Ho et al. 2020, Alg. 1), shifted if asked."""
        count = self.num_train_timesteps
        if shift == 1.0:
            return random.randint(count, device=device)
        fraction = shift_times(random.rand(device=device), shift)
        return (fraction * count).long().clamp(max=count - 1)

    def alphas_cumprod(self, times: Tensor) -> Tensor:
        return self.schedule.alphas_cumprod.to(times.device)[times].float()

    def add_noise(self, x0: Tensor, eps: Tensor, times: Tensor) -> Tensor:
        a = _flat(self.alphas_cumprod(times), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def training_target(self, prediction_type: str, x0: Tensor, eps: Tensor, times: Tensor) -> Tensor:
        check_prediction_type(self.name, prediction_type)
        return training_target(prediction_type, x0, eps, _flat(self.alphas_cumprod(times), x0))

    def network_timestep(self, times: Tensor) -> Tensor:
        return times


@dataclass(eq=False)
class RectifiedFlow(NoiseProcess):
    """Rectified flow x_t = (1 - t) x0 + t eps (Esser et al. 2024, SD3, Sec. 2), time-shifted by
    ``shift`` (t -> shift t / (1 + (shift - 1) t), Sec. 5.3.2), network timestep t * T."""

    shift: float = 1.0
    num_train_timesteps: int = 1000
    config: ScheduleConfig | None = None
    name: str = "flow"

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = ScheduleConfig(
                process="flow",
                prediction_type="flow",
                shift=self.shift,
                num_train_timesteps=self.num_train_timesteps,
            )

    @property
    def sigma_min(self) -> float:
        return float(sigma_from_t(torch.tensor(shift_times(1.0 / self.num_train_timesteps, self.shift))))

    @property
    def sigma_max(self) -> float:
        return FLOW_SIGMA_MAX

    def c_in(self, sigma: Tensor) -> Tensor:
        """1 / (1 + sigma) = 1 - t, exact at the cap so that the network sees the starting noise."""
        return 1 / (1 + sigma)

    def t(self, sigma: Tensor) -> Tensor:
        """Flow time of a VE level: sigma / (1 + sigma), and exactly 1 at (or above) the cap."""
        return torch.where(sigma >= FLOW_SIGMA_MAX, torch.ones_like(sigma), sigma / (1 + sigma))

    def timestep(self, sigma: Tensor, round_timesteps: bool = True) -> Tensor:
        """t * T, never rounded (SD3 is trained and sampled at fractional timesteps); float32, or float64
        for float64 levels."""
        dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        return self.t(sigma.to(dtype)) * self.num_train_timesteps

    def flow_times(self, steps: int, sampler: str, discretisation: str | None) -> np.ndarray:
        """The descending flow times [steps] as diffusers spaces them (float64 of its float32 values)."""
        if discretisation not in (None, "karras", "exponential"):
            raise ValueError(
                "a flow model's noise levels are its own (leave sigmas unset) or 'karras'/'exponential'; "
                f"{discretisation!r} is a timestep spacing of discrete schedules"
            )
        if discretisation is None and sampler in FLOW_DPM_SAMPLERS:
            return flow_times_dpm(steps, self.num_train_timesteps, self.shift)
        if discretisation is None and sampler == "unipc":
            return flow_times_unipc(steps, self.num_train_timesteps, self.shift)
        times = flow_times_euler(steps, self.num_train_timesteps, self.shift)
        if discretisation == "karras":
            return ramp_karras(times, steps)
        if discretisation == "exponential":
            return ramp_exponential(times, steps)
        return times

    def sampling_sigmas(self, steps: int, sampler: str, discretisation: str | None = None) -> Tensor:
        """FlowMatchEulerDiscreteScheduler's levels (and its Karras/exponential ramps over flow time), or
        DPMSolverMultistep/UniPCMultistepScheduler(use_flow_sigmas=True)'s for those solvers, then 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        schedules._family(sampler)  # unknown samplers are refused alike for both processes
        times = torch.from_numpy(self.flow_times(steps, sampler, discretisation).astype(np.float32))
        levels = sigma_from_t(times.double())
        if steps > 1 and levels[1] >= FLOW_SIGMA_MAX:
            raise ValueError(
                f"{steps} steps put more than the first flow time within {1 / (1 + FLOW_SIGMA_MAX):.1e} of "
                f"t = 1, where noise levels are capped at sigma {FLOW_SIGMA_MAX:g}: use fewer steps"
            )
        return torch.cat([levels, levels.new_zeros(1)]).float()

    def initial_noise_scale(self, sigmas: Tensor, sampler: str, discretisation: str | None = None) -> float:
        """1 / c_in = 1 + sigma_0: the flow latent at the first level is the unit noise itself (diffusers'
        SD3 pipeline starts from unscaled noise)."""
        return 1.0 + float(sigmas[0])

    def training_times(self, random: Draws, shift: float = 1.0, device: torch.device | None = None) -> Tensor:
        """Logit-normal t = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024, Sec. 3.1, m = 0, s = 1), then
        the time shift if asked."""
        t = torch.sigmoid(random.randn(device=device))
        return t if shift == 1.0 else shift_times(t, shift)

    def alphas_cumprod(self, times: Tensor) -> Tensor:
        """SNR = ((1 - t) / t)^2, so alpha_bar = (1 - t)^2 / ((1 - t)^2 + t^2)."""
        t = times.double()
        return ((1 - t) ** 2 / ((1 - t) ** 2 + t**2)).float()

    def add_noise(self, x0: Tensor, eps: Tensor, times: Tensor) -> Tensor:
        t = _flat(times, x0)
        return (1 - t) * x0 + t * eps

    def training_target(self, prediction_type: str, x0: Tensor, eps: Tensor, times: Tensor) -> Tensor:
        """The velocity eps - x0 (Esser et al. 2024, Eq. 6 with the flow's a, b), or eps or x0."""
        check_prediction_type(self.name, prediction_type)
        if prediction_type == "flow":
            return eps - x0
        return eps if prediction_type == "epsilon" else x0

    def network_timestep(self, times: Tensor) -> Tensor:
        return times.float() * self.num_train_timesteps


def sigma_from_t(t: Tensor) -> Tensor:
    """VE level t / (1 - t) of flow time t, capped at FLOW_SIGMA_MAX (t = 1 is pure noise)."""
    return torch.where(t >= 1, torch.full_like(t, FLOW_SIGMA_MAX), t / (1 - t).clamp(min=1e-30)).clamp(
        max=FLOW_SIGMA_MAX
    )


def shift_times(t: np.ndarray | Tensor | float, shift: float) -> np.ndarray | Tensor | float:
    """The time shift t -> shift t / (1 + (shift - 1) t) (Esser et al. 2024, Sec. 5.3.2)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times_euler(steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's times: evenly spaced from 1 to its shortest training time (which
    it has already shifted once), then shifted, so the last time is shifted twice, as diffusers does."""
    T = num_train_timesteps
    first = torch.tensor(1.0, dtype=torch.float32) / T  # the scheduler's shortest training time, float32
    t_min = float(shift * first / (1 + (shift - 1) * first))
    times = np.linspace(T * 1.0, T * t_min, steps) / T
    return shift_times(times, shift)


def flow_times_dpm(steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """DPMSolverMultistepScheduler(use_flow_sigmas=True)'s times: 1 - linspace(1, 1/T, steps + 1), shifted,
    descending, without the last (t = 0); the first is shift(1 - 1/T) < 1."""
    times = 1.0 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
    return np.flip(shift_times(times, shift))[:-1].copy()


def flow_times_unipc(steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """UniPCMultistepScheduler(use_flow_sigmas=True)'s times: linspace(1, 1/T, steps + 1) without its last,
    shifted; a first time of 1 becomes 1 - 1e-6 there (here: the cap, which stands for t = 1)."""
    times = shift_times(np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1], shift)
    if abs(times[0] - 1) < 1e-6:
        times[0] -= 1e-6
    return times


def ramp_karras(times: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5 over flow time between the spaced times' ends (diffusers' flow ramps)."""
    return schedules.sigmas_karras(steps, float(times[-1]), float(times[0]), rho).numpy()


def ramp_exponential(times: np.ndarray, steps: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(times[0]), math.log(times[-1]), steps))
