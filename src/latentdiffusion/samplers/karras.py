"""Euler and Heun integration of the probability-flow ODE (Karras et al. 2022, Alg. 1, no churn)."""

from __future__ import annotations

from torch import Tensor

from latentdiffusion.diffusion.noise import Generators
from latentdiffusion.samplers.common import (
    Callback,
    Denoiser,
    denoise,
    denoise_step,
    from_infinity,
    intervals,
    to_d,
)


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method (Karras et al. 2022, Alg. 1 without the 2nd-order correction): first order."""
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        # x + (sigma_next - sigma) d written as x0 + sigma_next d: the same step, without cancelling two
        # terms of size sigma |x| when sigma is large (zero-terminal-SNR and flow caps, sigma 4096)
        x = x0 + sigma_next * to_d(x, x0, sigma)
    return x


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1): Euler predictor, trapezoidal corrector.

    The step to sigma = 0 stays an Euler step (the derivative is undefined there), and so does a step
    from infinite noise (``common.from_infinity``).
    """
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        d = to_d(x, x0, sigma)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0 or from_infinity(sigma):
            x = x_euler
            continue
        d_next = to_d(x_euler, denoise(denoiser, x_euler, sigma_next), sigma_next)
        x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x
