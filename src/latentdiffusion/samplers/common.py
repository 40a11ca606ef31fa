"""Step helpers shared by the samplers (one home per idea).

All samplers integrate in VE space (Karras et al. 2022): x = x0 + sigma * eps, the probability-flow ODE
is dx/dsigma = (x - D(x, sigma)) / sigma. Step coefficients are computed in Python floats (double
precision) from the sigma list; tensors keep the device and dtype of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise

import torch
from torch import Tensor

from latentdiffusion.diffusion.noise import Generators, randn_like
from latentdiffusion.diffusion.schedules import SIGMA_CAP

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma [batch]) -> x0
Callback = Callable[[int, float, Tensor, Tensor], None]  # (i, sigma, x, x0)


def noise_levels(sigmas: Tensor) -> list[float]:
    """The sigma list as floats (one host sync), checked to be a strictly descending 1-D list of >= 2
    levels (a repeated level would make log-sigma step sizes 0)."""
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(
            f"sigmas must be a 1-D list of at least 2 noise levels, got shape {list(sigmas.shape)}"
        )
    levels = [float(s) for s in sigmas.tolist()]
    if any(b >= a for a, b in pairwise(levels)):
        raise ValueError(f"sigmas must be strictly descending, got {levels}")
    return levels


def intervals(sigmas: Tensor) -> Iterator[tuple[int, float, float]]:
    """(i, sigma_i, sigma_{i+1}) for every step of the list."""
    for i, (sigma, sigma_next) in enumerate(pairwise(noise_levels(sigmas))):
        yield i, sigma, sigma_next


def from_infinity(sigma: float) -> bool:
    """Whether a level stands for infinite noise: the cap (about 4096, ``schedules.SIGMA_CAP``) of
    zero-terminal-SNR schedules and of rectified flow at t = 1.

    A trapezoidal or pseudo-improved-Euler corrector over a step from there averages the derivative at a
    level that is really infinite with one at sigma_next; its error grows like sigma / sigma_next^2, so
    such a step stays an Euler (DDIM) step, the limit that is exact at infinity.
    """
    return sigma >= 0.999 * SIGMA_CAP


def denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """D(x, sigma) with sigma broadcast to the batch (float32, or float64 for float64 x)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=dtype))


def denoise_step(denoiser: Denoiser, x: Tensor, i: int, sigma: float, callback: Callback | None) -> Tensor:
    """The step's x0 estimate, reported to ``callback(i, sigma, x, x0)``."""
    x0 = denoise(denoiser, x, sigma)
    if callback is not None:
        callback(i, sigma, x, x0)
    return x0


def to_d(x: Tensor, x0: Tensor, sigma: float) -> Tensor:
    """The ODE derivative dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Eq. 4 with sigma(t) = t);
    in VE space it is also the eps estimate."""
    return (x - x0) / sigma


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to ``sigma_next`` into a deterministic part to ``sigma_down`` and fresh noise
    ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_next^2).

    eta = 1 is the DDPM posterior (Ho et al. 2020, Eq. 7), eta = 0 the deterministic DDIM step
    (Song et al. 2021, Eq. 16: sigma_up is their sigma_t(eta) in VE units).
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def ancestral_step(
    x: Tensor, x0: Tensor, sigma: float, sigma_next: float, eta: float, generator: Generators
) -> Tensor:
    """One DDIM(eta) step: an Euler step to sigma_down, then noise of std sigma_up."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    x = x0 + sigma_down * to_d(x, x0, sigma)
    return x + sigma_up * randn_like(x, generator) if sigma_up > 0 else x
