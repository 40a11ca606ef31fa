"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++", Alg. 2 and the SDE variant).

Written in VE terms with lambda = -log sigma (the half log-SNR) and step h = lambda_next - lambda.
"""

from __future__ import annotations

import math

from torch import Tensor

from latentdiffusion.diffusion.noise import Generators, randn_like
from latentdiffusion.samplers.common import Callback, Denoiser, denoise_step, intervals


def dpmpp_2m_step(
    x: Tensor,
    x0: Tensor,
    previous: tuple[Tensor, float] | None,
    sigma: float,
    sigma_next: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2, midpoint form), or its SDE form for eta > 0.

    ``previous`` is (x0, h) of the previous step, or None for a first-order step. With eta = 1 this is
    SDE-DPM-Solver++(2M): the deterministic part decays by exp(-h) more and ``noise`` of std
    sigma_next * sqrt(1 - exp(-2h)) is added.
    """
    if sigma_next == 0:
        return x0
    h = math.log(sigma / sigma_next)
    decay = -math.expm1(-h - eta * h)
    x_next = (sigma_next / sigma) * math.exp(-eta * h) * x + decay * x0
    if previous is not None:
        x0_previous, h_previous = previous
        x_next = x_next + (0.5 * decay * h / h_previous) * (x0 - x0_previous)
    if eta > 0 and noise is not None:
        x_next = x_next + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * noise
    return x_next


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep on the data prediction,
    first order on the first step and the step to sigma = 0."""
    previous = None
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        x = dpmpp_2m_step(x, x0, previous, sigma, sigma_next)
        previous = (x0, math.log(sigma / sigma_next)) if sigma_next > 0 else None
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, App. and diffusers' "sde-dpmsolver++", midpoint):
    the reverse SDE solved with the same multistep correction; eta = 0 gives DPM-Solver++(2M)."""
    previous = None
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        noise = randn_like(x, generator) if eta > 0 and sigma_next > 0 else None
        x = dpmpp_2m_step(x, x0, previous, sigma, sigma_next, eta, noise)
        previous = (x0, math.log(sigma / sigma_next)) if sigma_next > 0 else None
    return x
