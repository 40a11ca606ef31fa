"""UniPC (Zhao et al. 2023): unified predictor-corrector multistep solver on the data prediction.

VE terms: lambda = -log sigma, h = lambda_next - lambda. Each step evaluates the denoiser once; that
evaluation first corrects the point it was taken at (UniC) and then drives the next prediction (UniP),
as diffusers' UniPCMultistepScheduler does (predict_x0, lower_order_final).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from latentdiffusion.diffusion.noise import Generators
from latentdiffusion.samplers.common import Callback, Denoiser, denoise_step, noise_levels

VARIANTS = ("bh1", "bh2")


def unipc_weights(rks: Sequence[float], h: float, variant: str, corrector: bool) -> tuple[list[float], float]:
    """The weights rho of the differences and the factor B(h) (Zhao et al. 2023, Alg. 2 / Eq. 9-10).

    ``rks``: relative positions (lambda_k - lambda_s) / h of the older outputs; B(h) = h (bh1) or
    e^h - 1 (bh2), written for the data prediction (h -> -h). The order is len(rks) + 1.
    """
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    order = len(rks) + 1
    nodes = [*rks, 1.0]
    phi, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    if corrector and order == 1:
        return [0.5], b_h
    if not corrector and order <= 2:
        return [0.5] * (order - 1), b_h
    size = order if corrector else order - 1
    R = torch.tensor([[r ** (k - 1) for r in nodes[:size]] for k in range(1, size + 1)], dtype=torch.float64)
    rhos = torch.linalg.solve(R, torch.tensor(b[:size], dtype=torch.float64))
    return rhos.tolist(), b_h


def unipc_update(
    x: Tensor,
    outputs: Sequence[Tensor],
    lambdas: Sequence[float],
    lambda_next: float,
    order: int,
    variant: str,
    x0_next: Tensor | None = None,
) -> Tensor:
    """UniP (``x0_next`` None) or UniC (``x0_next`` = D at the predicted point) from lambdas[-1] to
    lambda_next, using the last ``order`` data predictions ``outputs`` at ``lambdas``."""
    h = lambda_next - lambdas[-1]
    m0 = outputs[-1]
    rks = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, order)]
    diffs = [(outputs[-1 - k] - m0) / r for k, r in enumerate(rks, start=1)]
    rhos, b_h = unipc_weights(rks, h, variant, corrector=x0_next is not None)
    if x0_next is not None:
        diffs.append(x0_next - m0)
    x_next = math.exp(-h) * x - math.expm1(-h) * m0
    if diffs:
        x_next = x_next - b_h * sum(rho * d for rho, d in zip(rhos, diffs, strict=True))
    return x_next


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    order: int = 2,
    variant: str = "bh2",
) -> Tensor:
    """UniPC-p (Zhao et al. 2023, Alg. 2-3) with B(h) variant "bh2" (diffusers' default for SD).

    Orders ramp up over the first steps and down over the last ones (lower_order_final); the step to
    sigma = 0 returns the data prediction.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; known: {', '.join(VARIANTS)}")
    levels = noise_levels(sigmas)
    n = len(levels) - 1
    outputs: list[Tensor] = []
    lambdas: list[float] = []
    x_start, used_order = x, 0
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise_step(denoiser, x, i, sigma, callback)
        if outputs:  # correct the point x0 was evaluated at with that same evaluation
            x = unipc_update(x_start, outputs, lambdas, -math.log(sigma), used_order, variant, x0)
        outputs, lambdas = [*outputs, x0][-order:], [*lambdas, -math.log(sigma)][-order:]
        used_order = min(order, n - i, len(outputs))
        x_start = x
        if sigma_next == 0:
            x = x0
        else:
            x = unipc_update(x, outputs, lambdas, -math.log(sigma_next), used_order, variant)
    return x
