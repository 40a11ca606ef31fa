"""Samplers: pure functions ``sample_<name>(denoiser, x, sigmas, *, generator, callback, **options) -> x``.

A denoiser is any callable D(x, sigma) -> x0 with sigma of shape [batch]; ``sigmas`` is a descending
1-D list of VE noise levels and x starts at noise * sigmas[0] (see ``diffusion.schedules``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from latentdiffusion.diffusion.noise import Generators
from latentdiffusion.samplers.ancestral import sample_ddim, sample_ddpm, sample_euler_ancestral
from latentdiffusion.samplers.common import Callback, Denoiser
from latentdiffusion.samplers.consistency import sample_lcm, sample_tcd
from latentdiffusion.samplers.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from latentdiffusion.samplers.karras import sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_heun
from latentdiffusion.samplers.multistep import sample_lms, sample_plms
from latentdiffusion.samplers.unipc import sample_unipc

Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}
# Samplers that step on the model's discrete training grid and take its NoiseSchedule as ``schedule=``
# (LCM for its boundary scalings, TCD for its intermediate level); ``eta`` is TCD's gamma.
GRID_SAMPLERS = ("lcm", "tcd")


def sample(
    name: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generators = None,
    callback: Callback | None = None,
    **options: Any,
) -> Tensor:
    """Run the sampler called ``name`` from x (at sigmas[0]) down the noise levels ``sigmas``."""
    try:
        sampler = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}") from None
    return sampler(denoiser, x, sigmas, generator=generator, callback=callback, **options)


__all__ = ["GRID_SAMPLERS", "SAMPLERS", "sample"] + [f.__name__ for f in SAMPLERS.values()]
