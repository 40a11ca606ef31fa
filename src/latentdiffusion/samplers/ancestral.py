"""Single-step samplers built on the DDIM(eta) step: DDIM, DDPM, Euler ancestral and LCM.

In VE space the DDIM update is an Euler step of the probability-flow ODE (Karras et al. 2022, Sec. 4),
and DDPM's posterior step is DDIM with eta = 1; they differ from Euler (ancestral) only in the noise
levels they are usually given (``sampling_sigmas``).
"""

from __future__ import annotations

from torch import Tensor

from latentdiffusion.diffusion.noise import Generators, randn_like
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


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Latent consistency model multistep sampling (Luo et al. 2023, Alg. 1; Song et al. 2023, Alg. 1).

    The denoiser is a consistency function: each step jumps to its x0 estimate, then re-noises it to the
    next level with fresh noise. The consistency boundary scalings of diffusers' LCMScheduler
    (c_skip < 1e-5 at LCM's timesteps >= 19) belong to the model and are not applied here.
    """
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        x = x0 + sigma_next * randn_like(x0, generator) if sigma_next > 0 else x0
    return x
