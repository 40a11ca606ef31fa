"""Single-step samplers built on the DDIM(eta) step: DDIM, DDPM and Euler ancestral (LCM and TCD, which
step on a training grid, are in ``samplers.consistency``).

In VE space the DDIM update is an Euler step of the probability-flow ODE (Karras et al. 2022, Sec. 4),
and DDPM's posterior step is DDIM with eta = 1; they differ from Euler (ancestral) only in the noise
levels they are usually given (``sampling_sigmas``).
"""

from __future__ import annotations

from torch import Tensor

from latentdiffusion.diffusion.noise import Generators
from latentdiffusion.samplers.common import Callback, Denoiser, ancestral_step, denoise_step, intervals


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for eta = 0, the DDPM posterior for eta = 1."""
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        x = ancestral_step(x, x0, sigma, sigma_next, eta, generator)
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with the "fixed small" posterior variance,
    over any subsequence of training steps: the posterior q(x_s | x_t, x0) with x0 = D(x_t)."""
    return sample_ddim(denoiser, x, sigmas, generator=generator, callback=callback, eta=1.0)


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler ancestral (k-diffusion; Karras et al. 2022 Euler step with DDPM-style fresh noise)."""
    return sample_ddim(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta)
