"""ComfyUI's schedulers (``comfy/samplers.py``: ``SCHEDULER_HANDLERS``) on a discrete VP model, level for
level: the noise levels a KSampler node visits, and the scale of its starting noise.

ComfyUI reads its levels off ``ModelSamplingDiscrete``: the table sigma_t = sqrt((1 - a_t) / a_t) of
the training schedule in float32, with continuous t mapped to sigma by interpolating log sigma. Its
network is evaluated at the table entry nearest to sigma in log sigma (``ModelSamplingDiscrete.timestep``);
our Denoiser's rounded timesteps (the default) pick the same entry. The discretisations themselves are
library functions in ``diffusion.schedules``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from latentdiffusion.diffusion import schedules
from latentdiffusion.errors import UserError

TableScheduler = Callable[[Tensor, int], Tensor]  # (float64 table, steps) -> descending float32 + [0]


def _ramp(make: Callable[..., Tensor]) -> TableScheduler:
    """A ramp between the table's float32 ends, computed in float32 as ComfyUI does."""

    def levels(table: Tensor, steps: int) -> Tensor:
        ends = table.float()
        ramp = make(steps, float(ends[0]), float(ends[-1]), dtype=torch.float32)
        return torch.cat([ramp, ramp.new_zeros(1)])

    return levels


def _beta(table: Tensor, steps: int) -> Tensor:
    try:
        return schedules.sigmas_beta(table, steps)
    except ImportError:
        raise UserError("the 'beta' scheduler needs scipy: pip install 'latentdiffusion[serve]'") from None


SCHEDULERS: dict[str, TableScheduler] = {
    "simple": schedules.sigmas_simple,
    "sgm_uniform": schedules.TABLE_DISCRETISATIONS["sgm_uniform"],
    "karras": _ramp(schedules.sigmas_karras),
    "exponential": _ramp(schedules.sigmas_exponential),
    "ddim_uniform": schedules.sigmas_ddim_uniform,
    "beta": _beta,
    "normal": schedules.sigmas_uniform_t,
    "linear_quadratic": schedules.TABLE_DISCRETISATIONS["linear_quadratic"],
    "kl_optimal": schedules.TABLE_DISCRETISATIONS["kl_optimal"],
}


def comfy_sigmas(scheduler: str, table: Tensor, steps: int) -> Tensor:
    """The levels [<= steps + 1] (float32, ending in 0) of ComfyUI's ``calculate_sigmas(scheduler)``."""
    return SCHEDULERS[scheduler](table, steps)


def comfy_start_scale(sigma_0: float, table: Tensor) -> float:
    """ComfyUI's noise scaling for an eps/v model: unit noise times sqrt(1 + sigma^2) when the run starts
    at the table's top level ("max denoise"), times sigma otherwise (``EPS.noise_scaling``)."""
    sigma_max = float(table.float()[-1])
    if math.isclose(sigma_max, sigma_0, rel_tol=1e-5) or sigma_0 > sigma_max:
        return math.sqrt(1.0 + sigma_0**2)
    return sigma_0
