"""Linear multistep samplers that reuse past derivatives: PLMS (PNDM) and LMS."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from latentdiffusion.diffusion.noise import Generators
from latentdiffusion.samplers.common import (
    Callback,
    Denoiser,
    denoise,
    denoise_step,
    from_infinity,
    intervals,
    noise_levels,
    to_d,
)

# Adams-Bashforth weights for equal steps, newest derivative first (Liu et al. 2022, Eq. 12).
ADAMS_BASHFORTH: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def adams_bashforth(history: Sequence[Tensor]) -> Tensor:
    """The extrapolated derivative from the last len(history) <= 4 ones (oldest first)."""
    weights = ADAMS_BASHFORTH[len(history) - 1]
    return sum(w * d for w, d in zip(weights, reversed(history), strict=True))


def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Pseudo linear multistep (PLMS) of Liu et al. 2022 (PNDM, Eq. 12), as diffusers' PNDMScheduler
    with ``skip_prk_steps``: eps estimates combined by Adams-Bashforth (orders 1-4, equal-step
    weights) and moved with the DDIM transfer, which in VE space is x += (sigma_next - sigma) * eps.

    Instead of PNDM's Runge-Kutta warm-up the first step is a pseudo improved Euler (Heun) step, or an
    Euler step from infinite noise (``common.from_infinity``).
    """
    history: list[Tensor] = []
    several_steps = sigmas.shape[0] > 2
    for i, sigma, sigma_next in intervals(sigmas):
        eps = to_d(x, denoise_step(denoiser, x, i, sigma, callback), sigma)
        if not history and several_steps and not from_infinity(sigma):
            x_euler = x + (sigma_next - sigma) * eps
            eps_next = to_d(x_euler, denoise(denoiser, x_euler, sigma_next), sigma_next)
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = adams_bashforth([*history, eps])
        history = [*history[-2:], eps]
        x = x + (sigma_next - sigma) * eps_prime
    return x


def lms_coefficient(levels: Sequence[float], i: int, j: int, order: int) -> float:
    """Integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial through
    sigma_i, ..., sigma_{i-order+1} that is 1 at sigma_{i-j} (integrated exactly)."""
    nodes = [levels[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial([1.0])
    for node in nodes:
        basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (levels[i - j] - node)
    integral = basis.integ()
    return float(integral(levels[i + 1]) - integral(levels[i]))


def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth with variable steps, k-diffusion's ``sample_lms``; Karras
    et al. 2022 ODE): the last ``order`` derivatives interpolated by a polynomial in sigma, integrated
    over the step. The order ramps up over the first steps."""
    levels = noise_levels(sigmas)
    history: list[Tensor] = []
    for i, sigma, _ in intervals(sigmas):
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        history = [*history, to_d(x, x0, sigma)][-order:]
        weights = [lms_coefficient(levels, i, j, len(history)) for j in range(len(history))]
        x = x + sum(w * d for w, d in zip(weights, reversed(history), strict=True))
    return x
