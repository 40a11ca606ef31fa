"""Euler, Heun and DPM-Solver-2 integration of the probability-flow ODE (Karras et al. 2022, Alg. 1, no
churn), and DPM-Solver-2 with ancestral noise."""

from __future__ import annotations

import math

from torch import Tensor

from latentdiffusion.diffusion.noise import Generators, randn_like
from latentdiffusion.samplers.common import (
    Callback,
    Denoiser,
    ancestral_sigmas,
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


def _log_midpoint(sigma: float, sigma_next: float) -> float:
    """The geometric mean sqrt(sigma * sigma_next): the midpoint in log sigma."""
    return math.exp((math.log(sigma) + math.log(sigma_next)) / 2)


def _dpm_2_step(denoiser: Denoiser, x: Tensor, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One DPM-Solver-2 step (Lu et al. 2022, Alg. 1; k-diffusion's variant, Karras et al. 2022 Sec. 3):
    an Euler step to the log-sigma midpoint, then the full step with the midpoint's derivative. A step to
    sigma = 0 (or from infinite noise) stays an Euler step."""
    d = to_d(x, x0, sigma)
    if sigma_next == 0 or from_infinity(sigma):
        return x + (sigma_next - sigma) * d
    sigma_mid = _log_midpoint(sigma, sigma_next)
    x_mid = x + (sigma_mid - sigma) * d
    d_mid = to_d(x_mid, denoise(denoiser, x_mid, sigma_mid), sigma_mid)
    return x + (sigma_next - sigma) * d_mid


def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver-2 in sigma (k-diffusion's ``sample_dpm_2``, no churn): second order, two evaluations
    per step."""
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        x = _dpm_2_step(denoiser, x, x0, sigma, sigma_next)
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion's ``sample_dpm_2_ancestral``): a DPM-2 step to sigma_down,
    then fresh noise of std sigma_up (``common.ancestral_sigmas``); a step that ends at 0 is an Euler
    step without noise."""
    for i, sigma, sigma_next in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        x = _dpm_2_step(denoiser, x, x0, sigma, sigma_down)
        if sigma_down > 0 and sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
    return x
